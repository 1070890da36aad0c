//! One request to the controller over its socket, and where that socket is: the lowest layer
//! of every CLI command (`set`, `ls`, `status`, `suspend`, `top`, `run`).

use gpuslice_common::protocol::*;
use std::time::Duration;

/// How long a command waits for the controller's answer, unless it says otherwise.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the controller listens: the flag, else $GPUSLICE_SOCKET, else the default.
#[derive(clap::Args, Clone, Default)]
pub struct SocketArg {
    /// The controller's socket (default $GPUSLICE_SOCKET, else /run/gpuslice/gpuslice.sock).
    #[arg(long)]
    socket: Option<String>,
}

impl SocketArg {
    pub fn path(&self) -> String {
        self.socket.clone().or_else(|| std::env::var(ENV_SOCKET).ok().filter(|s| !s.is_empty())).unwrap_or_else(|| DEFAULT_SOCKET.to_string())
    }
}

/// One request, waiting up to the default time for the answer.
pub fn ask(socket: &str, request: &Request) -> Result<Response, String> {
    ask_within(socket, request, TIMEOUT)
}

/// One request; a refusal or a missing controller becomes a message that says what to do.
pub fn ask_within(socket: &str, request: &Request, timeout: Duration) -> Result<Response, String> {
    match call(socket, request, timeout) {
        Ok((Response::Error { message }, _)) => Err(message),
        Ok((r, _)) => Ok(r),
        Err(FrameError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            Err(format!("no gpuslice controller at {socket} ({e}); start one with `gpuslice serve`, or point --socket / {ENV_SOCKET} at it"))
        }
        Err(e) => Err(format!("talking to the controller at {socket}: {e}")),
    }
}
