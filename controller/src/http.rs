//! The metrics endpoint's HTTP server: `GET /metrics` on a std `TcpListener`, nothing else.
//!
//! One accept thread, one short-lived thread per connection (at most `MAX_CONNECTIONS`), one
//! request per connection (`Connection: close`). A client gets `CLIENT_TIMEOUT` to send its
//! request head, so an idle connection delays no scrape.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::time::Duration;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CONNECTIONS: usize = 16;
/// A request head longer than this is refused (a scrape's is a few hundred bytes).
const MAX_HEAD: usize = 8192;

/// What a handler answers with.
pub struct Page {
    pub content_type: &'static str,
    pub body: String,
}

/// A bound listener, not serving yet: bind early (a bad address stops the controller before it
/// takes the socket), serve once the state exists.
pub struct Server {
    listener: TcpListener,
}

impl Server {
    /// Binds `addr` (`host:port`; port 0 picks a free one).
    pub fn bind(addr: &str) -> Result<Server, String> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(|e| format!("metrics address {addr:?}: not a host:port address ({e})"))?.collect();
        let listener = TcpListener::bind(&addrs[..]).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        Ok(Server { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves `GET /metrics` with `handler` in a thread of its own, for the process's life.
    pub fn spawn(self, handler: impl Fn() -> Page + Send + Sync + 'static) -> Result<(), String> {
        let handler = Arc::new(handler);
        let open = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("gpuslice-metrics".into())
            .spawn(move || {
                for stream in self.listener.incoming() {
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("metrics: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    if open.fetch_add(1, AcqRel) >= MAX_CONNECTIONS {
                        open.fetch_sub(1, AcqRel);
                        tracing::warn!("metrics: {MAX_CONNECTIONS} connections already open; closing a new one");
                        continue;
                    }
                    let (handler, place) = (handler.clone(), Place(open.clone()));
                    let spawned = std::thread::Builder::new().name("gpuslice-scrape".into()).spawn(move || {
                        let _place = place;
                        if let Err(e) = answer(stream, &*handler) {
                            tracing::debug!("metrics: connection dropped: {e}");
                        }
                    });
                    if let Err(e) = spawned {
                        tracing::warn!("metrics: cannot start a thread for a connection: {e}");
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| format!("cannot start the metrics thread: {e}"))
    }
}

/// One of the `MAX_CONNECTIONS` places, given back when the connection's thread ends (even by
/// a panic, or when the thread could not start).
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AcqRel);
    }
}

fn answer(mut stream: TcpStream, handler: &dyn Fn() -> Page) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let (status, page) = match route(&head) {
        Route::Metrics => ("200 OK", handler()),
        Route::NotFound => ("404 Not Found", text("not found: the metrics are at GET /metrics\n")),
        Route::NotAllowed => ("405 Method Not Allowed", text("only GET is served\n")),
        Route::Bad => ("400 Bad Request", text("bad request\n")),
    };
    let head_only = head.starts_with("HEAD ");
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        page.content_type,
        page.body.len(),
        if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" }
    );
    if !head_only {
        response.push_str(&page.body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

fn text(body: &str) -> Page {
    Page { content_type: "text/plain; charset=utf-8", body: body.to_string() }
}

/// Reads up to the blank line that ends the request head.
fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "request head too long"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[derive(Debug, PartialEq)]
enum Route {
    Metrics,
    NotFound,
    NotAllowed,
    Bad,
}

fn route(head: &str) -> Route {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (words.next(), words.next()) else { return Route::Bad };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Route::Metrics,
        ("GET" | "HEAD", _) => Route::NotFound,
        (_, "/metrics") => Route::NotAllowed,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_get_metrics_and_nothing_else() {
        let server = Server::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr();
        server.spawn(|| Page { content_type: "text/plain; version=0.0.4", body: "x_total 1\n".into() }).unwrap();
        // An idle connection delays no one.
        let _idle = TcpStream::connect(addr).unwrap();
        let ok = get(addr, "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 10\r\n") && ok.ends_with("\r\n\r\nx_total 1\n"), "{ok}");
        assert!(get(addr, "GET / HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 404 "));
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET"), "{post}");
        assert!(get(addr, "\r\n\r\n").starts_with("HTTP/1.1 400 "));
        let head = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn a_bad_address_is_named() {
        let e = Server::bind("nowhere").err().unwrap();
        assert!(e.contains("nowhere"), "{e}");
    }
}
