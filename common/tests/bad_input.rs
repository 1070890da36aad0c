//! Bad input for everything common parses from outside: the socket's framing and its JSON
//! decoder (arbitrary byte streams, split reads, huge lengths, invalid UTF-8 and JSON, wrong
//! types, mutated requests), config files and environment values, and ledger files of any
//! content. Each property says what must hold besides "no panic": a frame reader that agrees
//! with a reference parser, requests that round-trip, errors on one line that name their source.
//!
//! Bounded by case counts (see docs/RELIABILITY.md for the counts and the time they take);
//! `PROPTEST_CASES` raises them all for a longer local run.

use gpuslice_common::ledger::{Geometry, Ledger, LedgerError, Priority};
use gpuslice_common::protocol::*;
use gpuslice_common::settings::{env_pairs, FileSettings, Settings};
use gpuslice_common::size::parse_size;
use proptest::prelude::*;
use serde_json::Value;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// `n` cases, or `PROPTEST_CASES` when set (a longer run).
fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(n);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

// ------------------------------------------------------------------------------ framing

/// What `recv_frame` must return for a stream, frame by frame, read until the first error.
#[derive(Debug, PartialEq)]
enum Read {
    Frame(Vec<u8>),
    TooLarge(usize),
    Closed,
}

fn reference_frames(stream: &[u8]) -> Vec<Read> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        if stream.len() - at < 4 {
            out.push(Read::Closed);
            return out;
        }
        let len = u32::from_le_bytes(stream[at..at + 4].try_into().unwrap()) as usize;
        at += 4;
        if len > MAX_FRAME {
            out.push(Read::TooLarge(len));
            return out;
        }
        if stream.len() - at < len {
            out.push(Read::Closed);
            return out;
        }
        out.push(Read::Frame(stream[at..at + len].to_vec()));
        at += len;
    }
}

/// Writes `stream` into a socket in the given chunk sizes (each written separately, with a
/// yield between, so the reader sees split frames), closes it, and returns what `recv_frame`
/// read on the other end until its first error.
fn read_through_socket(stream: &[u8], chunks: &[usize]) -> Vec<Read> {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let bytes = stream.to_vec();
    let sizes = chunks.to_vec();
    let writer = std::thread::spawn(move || {
        let mut a = a;
        let mut at = 0;
        let mut sizes = sizes.into_iter().cycle();
        while at < bytes.len() {
            let n = sizes.next().unwrap_or(bytes.len()).clamp(1, bytes.len() - at);
            if a.write_all(&bytes[at..at + n]).is_err() {
                return; // The reader stopped (a frame too large): nothing more to say.
            }
            at += n;
            std::thread::yield_now();
        }
    });
    let mut out = Vec::new();
    loop {
        match recv_frame(b.as_raw_fd()) {
            Ok((body, fd)) => {
                assert!(fd.is_none(), "no descriptor was sent");
                out.push(Read::Frame(body));
            }
            Err(FrameError::TooLarge(n)) => {
                out.push(Read::TooLarge(n));
                break;
            }
            Err(FrameError::Closed) => {
                out.push(Read::Closed);
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    drop(b);
    writer.join().unwrap();
    out
}

/// A stream of frames: some well formed, some cut short, some with a huge length.
fn frame_streams() -> impl Strategy<Value = Vec<u8>> {
    let frame = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(|body| {
            let mut f = (body.len() as u32).to_le_bytes().to_vec();
            f.extend(body);
            f
        }),
        1 => ((MAX_FRAME as u32 + 1)..=u32::MAX, proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(len, tail)| {
            let mut f = len.to_le_bytes().to_vec();
            f.extend(tail);
            f
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ];
    proptest::collection::vec(frame, 0..6).prop_map(|frames| frames.concat())
}

proptest! {
    #![proptest_config(cases(300))]

    /// Any byte stream, split anywhere: the reader returns exactly the frames a reference
    /// parser finds, then `TooLarge` or `Closed`; never a panic, never a hang.
    #[test]
    fn the_frame_reader_agrees_with_a_reference_parser(stream in frame_streams(), chunks in proptest::collection::vec(1usize..64, 1..8)) {
        prop_assert_eq!(read_through_socket(&stream, &chunks), reference_frames(&stream));
    }

    /// Well-formed requests sent back to back in pieces of any size come out whole and equal.
    #[test]
    fn requests_split_anywhere_arrive_whole(requests in proptest::collection::vec(requests(), 1..4), chunks in proptest::collection::vec(1usize..40, 1..6)) {
        let mut stream = Vec::new();
        for r in &requests {
            let body = encode(r);
            stream.extend((body.len() as u32).to_le_bytes());
            stream.extend(body);
        }
        let read = read_through_socket(&stream, &chunks);
        prop_assert_eq!(read.len(), requests.len() + 1);
        for (r, got) in requests.iter().zip(&read) {
            let Read::Frame(body) = got else { panic!("{got:?}") };
            prop_assert_eq!(&decode_request(body).unwrap(), r);
        }
    }
}

/// A frame announcing more than `MAX_FRAME` is refused at once, without waiting for a body
/// that never comes (the writer keeps the connection open; a reader that waited would time out).
#[test]
fn huge_lengths_are_refused_before_any_body() {
    for len in [MAX_FRAME as u32 + 1, 1 << 24, u32::MAX - 1, u32::MAX] {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        a.write_all(&len.to_le_bytes()).unwrap();
        let start = std::time::Instant::now();
        match recv_frame(b.as_raw_fd()) {
            Err(FrameError::TooLarge(n)) => assert_eq!(n, len as usize),
            other => panic!("length {len}: {:?}", other.map(|(b, _)| b.len())),
        }
        assert!(start.elapsed() < Duration::from_secs(1), "refused without waiting for the body");
    }
}

// ------------------------------------------------------------------------------ decoding

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,24}", "[a-z0-9_.:/@-]{1,12}", Just(String::new()), "\\PC{0,80}"]
}

fn priorities() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Low), Just(Priority::Normal), Just(Priority::High)]
}

fn requests() -> impl Strategy<Value = Request> {
    let claim = (any::<u32>(), text(), any::<u64>(), proptest::option::of(any::<u64>()), proptest::option::of(any::<u32>()))
        .prop_map(|(ordinal, uuid, total_memory, memory_limit, sm_share)| DeviceClaim { ordinal, uuid, total_memory, memory_limit, sm_share, sm_max: 0 });
    let register =
        (any::<u32>(), proptest::option::of(text()), proptest::option::of(priorities()), text(), any::<u32>(), proptest::collection::vec(claim, 0..4))
            .prop_map(|(protocol, group, priority, name, own_pid, devices)| {
                Request::Register(Registration { protocol, group, priority, name, own_pid, devices })
            });
    let target = prop_oneof![any::<u32>().prop_map(Target::Pid), text().prop_map(Target::Group)];
    let limit = prop_oneof![any::<u64>().prop_map(Limit::Bytes), Just(Limit::Unlimited)];
    let set = (
        target,
        proptest::option::of(limit),
        proptest::option::of(any::<u32>()),
        proptest::option::of(priorities()),
        proptest::option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(|(target, memory, sm, priority, device, create)| Request::Set(Edit { target, memory, sm, sm_max: None, priority, device, create }));
    prop_oneof![register, set, Just(Request::List), Just(Request::Status), text().prop_map(Request::RemoveGroup)]
}

/// Any JSON value, with the protocol's own field names and variant names common among the keys
/// and strings, so that the decoder meets well-shaped objects with wrongly typed fields.
fn json() -> impl Strategy<Value = Value> {
    const WORDS: &[&str] = &[
        "type",
        "register",
        "set",
        "list",
        "status",
        "protocol",
        "group",
        "priority",
        "name",
        "own_pid",
        "devices",
        "ordinal",
        "uuid",
        "total_memory",
        "memory_limit",
        "sm_share",
        "target",
        "pid",
        "memory",
        "bytes",
        "unlimited",
        "sm",
        "device",
        "high",
    ];
    let word = proptest::sample::select(WORDS).prop_map(str::to_string);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        word.clone().prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        let key = prop_oneof![3 => word.clone(), 1 => text()];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Byte-level damage to a message: flips, cuts, insertions (invalid UTF-8 among them).
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Cut(usize, usize),
    Insert(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Vec<Damage>> {
    let one = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, x)| Damage::Flip(at, x)),
        (any::<usize>(), 1usize..8).prop_map(|(at, n)| Damage::Cut(at, n)),
        (any::<usize>(), prop_oneof![proptest::collection::vec(any::<u8>(), 1..6), Just(vec![0xff, 0xfe]), Just(b"\"\\ud800\"".to_vec())])
            .prop_map(|(at, b)| Damage::Insert(at, b)),
    ];
    proptest::collection::vec(one, 1..5)
}

fn apply(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        let len = bytes.len().max(1);
        match d {
            Damage::Flip(at, x) if !bytes.is_empty() => bytes[at % len] ^= x | 1,
            Damage::Cut(at, n) if !bytes.is_empty() => {
                let from = at % len;
                bytes.drain(from..(from + n).min(bytes.len()));
            }
            Damage::Insert(at, b) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            _ => {}
        }
    }
    bytes
}

/// Whatever the decoder accepts is a request that survives encoding and decoding again, so the
/// controller never acts on something it could not have been sent.
fn accepted_round_trips(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode_request(bytes) {
        Ok(r) => prop_assert_eq!(decode_request(&encode(&r)).unwrap(), r),
        Err(FrameError::Malformed(m)) => prop_assert!(!m.is_empty() && !m.contains('\n'), "one line: {m:?}"),
        Err(e) => prop_assert!(false, "only Malformed comes from decoding, got {e}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(800))]

    #[test]
    fn any_bytes_are_a_request_or_one_line_of_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        accepted_round_trips(&bytes)?;
    }

    #[test]
    fn any_json_is_a_request_or_one_line_of_error(value in json()) {
        accepted_round_trips(&serde_json::to_vec(&value).unwrap())?;
    }

    #[test]
    fn well_formed_requests_round_trip(r in requests()) {
        prop_assert_eq!(decode_request(&encode(&r)).unwrap(), r);
    }

    #[test]
    fn damaged_requests_are_refused_or_round_trip(r in requests(), d in damage()) {
        accepted_round_trips(&apply(encode(&r), &d))?;
    }

    /// Each field of a real request replaced by a JSON value of any type.
    #[test]
    fn wrongly_typed_fields_are_refused_or_round_trip(r in requests(), path in any::<proptest::sample::Index>(), value in json()) {
        let mut doc: Value = serde_json::from_slice(&encode(&r)).unwrap();
        let mut slots = Vec::new();
        collect_slots(&doc, &mut Vec::new(), &mut slots);
        let chosen = &slots[path.index(slots.len())];
        *pointer_mut(&mut doc, chosen) = value;
        accepted_round_trips(&serde_json::to_vec(&doc).unwrap())?;
    }

    /// The controller's answers go through the same decoder in every shim and CLI.
    #[test]
    fn any_bytes_are_a_response_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256), value in json()) {
        let _ = decode_response(&bytes);
        let _ = decode_response(&serde_json::to_vec(&value).unwrap());
    }
}

/// Every value position in a JSON document, as a path of keys and indices.
fn collect_slots(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(Value::from(k.clone()));
                collect_slots(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(Value::from(i));
                collect_slots(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn pointer_mut<'a>(mut v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    for step in path {
        v = match step {
            Value::String(k) => v.get_mut(k.as_str()).unwrap(),
            Value::Number(i) => v.get_mut(i.as_u64().unwrap() as usize).unwrap(),
            _ => unreachable!(),
        };
    }
    v
}

// ------------------------------------------------------------------------------ settings

/// The names the settings read, and a few near misses.
const VARS: &[&str] = &[
    "GPUSLICE_MEMORY_LIMIT",
    "GPUSLICE_MEMORY_LIMIT_0",
    "GPUSLICE_MEMORY_LIMIT_3",
    "GPUSLICE_MEMORY_LIMIT_x",
    "GPUSLICE_MEMORY_LIMIT_",
    "CUDA_DEVICE_MEMORY_LIMIT",
    "CUDA_DEVICE_MEMORY_LIMIT_1",
    "CUDA_DEVICE_MEMORY_LIMIT_y",
    "GPUSLICE_SM_SHARE",
    "GPUSLICE_SM_SHARE_0",
    "CUDA_DEVICE_SM_LIMIT",
    "CUDA_DEVICE_SM_LIMIT_2",
    "GPUSLICE_PRIORITY",
    "GPUSLICE_PRIORITY_QUEUE",
    "GPUSLICE_PRIORITY_GATE",
    "GPUSLICE_GROUP",
    "PATH",
];

fn values() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9.]{0,22}[ kKmMgGtTiIbB%]{0,4}",
        "-?[0-9]{1,25}",
        "\\PC{0,30}",
        Just("high".to_string()),
        Just("0".to_string()),
        Just("18446744073709551615".to_string()),
        Just("16777216T".to_string()),
    ]
}

proptest! {
    #![proptest_config(cases(1500))]

    #[test]
    fn sizes_parse_or_say_why(s in prop_oneof!["[0-9.]{0,25}[ kKmMgGtTiIbB]{0,4}", "\\PC{0,40}"]) {
        match parse_size(&s) {
            Ok(bytes) => prop_assert!(bytes > 0),
            Err(e) => prop_assert!(e.to_string().contains("is not a size")),
        }
    }

    /// Any environment of our variables: settings, or one error naming one of the variables
    /// that were set and the value it had.
    #[test]
    fn environments_resolve_or_name_the_variable(vars in proptest::collection::vec((proptest::sample::select(VARS), values()), 0..6)) {
        let vars: Vec<(String, String)> = vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if let Err(e) = Settings::resolve(&vars, None) {
            prop_assert!(vars.iter().any(|(k, v)| *k == e.origin && *v == e.value), "{e} names a variable that was set: {vars:?}");
            prop_assert!(!e.to_string().contains('\n'));
        }
    }
}

proptest! {
    #![proptest_config(cases(600))]

    /// Bytes that are not UTF-8 in a variable the settings read are an error naming it, never
    /// a silently skipped limit; in anyone else's variables they are none of ours.
    #[test]
    fn variables_that_are_not_utf8(name in proptest::sample::select(VARS), bytes in proptest::collection::vec(any::<u8>(), 1..12)) {
        use std::os::unix::ffi::OsStringExt;
        let value = std::ffi::OsString::from_vec(bytes.clone());
        let ours = name != "PATH";
        match env_pairs([(std::ffi::OsString::from(name), value)]) {
            Ok(pairs) => prop_assert!(std::str::from_utf8(&bytes).is_ok() || (!ours && pairs.is_empty())),
            Err(e) => prop_assert!(ours && std::str::from_utf8(&bytes).is_err() && e.origin == name, "{e}"),
        }
    }

    /// Config text of any shape: settings, or one line naming the file.
    #[test]
    fn config_files_parse_or_say_where(text in config_texts()) {
        if let Err(e) = FileSettings::parse("/etc/gpuslice/test.toml", &text) {
            let line = e.to_string();
            prop_assert!(line.contains("/etc/gpuslice/test.toml"), "{line}");
            prop_assert!(!line.contains('\n'), "one line: {line}");
        }
    }
}

fn config_texts() -> impl Strategy<Value = String> {
    let table = prop_oneof![
        Just("[defaults]".to_string()),
        Just("[controller]".to_string()),
        "\\[groups\\.[a-z\\- .\"]{0,8}\\]",
        "\\[defaults\\.devices\\.[0-9a-z]{0,3}\\]",
        "\\[[a-z.]{0,10}\\]",
    ];
    let key = prop_oneof![Just("memory_limit"), Just("sm_share"), Just("priority"), Just("socket"), Just("ledger"), Just("devices"), Just("memory"),];
    let value = prop_oneof![
        "\"[0-9.]{0,6}[kKmMgG]{0,3}[iB]{0,2}\"",
        "-?[0-9]{1,22}",
        Just("true".to_string()),
        Just("1.5".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        "\"\\PC{0,10}\"",
        "[\\[\\]{}=\"',#]{1,4}",
    ];
    let line = prop_oneof![table, (key, value).prop_map(|(k, v)| format!("{k} = {v}")), "\\PC{0,20}"];
    proptest::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
}

// ------------------------------------------------------------------------------ ledger files

/// A valid ledger's bytes (4 groups, 8 processes).
fn valid_ledger() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger");
    Ledger::create(path.to_str().unwrap(), Geometry { max_groups: 4, max_procs: 8 }).unwrap();
    std::fs::read(&path).unwrap()
}

/// Maps `bytes` as a ledger; when accepted, every slot must be reachable.
fn map_bytes(bytes: &[u8]) -> Result<(), LedgerError> {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(bytes).unwrap();
    let ledger = Ledger::map_fd(file.as_fd(), "(test)")?;
    let g = ledger.geometry();
    for (_, p) in ledger.processes() {
        let _ = p.state.load(std::sync::atomic::Ordering::Relaxed);
    }
    for (_, group) in ledger.groups() {
        let _ = group.name();
    }
    assert!(g.max_groups >= 1 && g.max_procs >= 1);
    Ok(())
}

proptest! {
    #![proptest_config(cases(250))]

    /// Random words written over a valid ledger's header, or the file cut anywhere: it is
    /// refused with a reason, or (when the damage left every checked field intact) mapped with
    /// every slot in range; never a panic, never an out-of-range slot.
    #[test]
    fn damaged_ledger_files_are_refused_or_sound(words in proptest::collection::vec((0usize..64, any::<u64>()), 0..4), cut in proptest::option::of(any::<proptest::sample::Index>())) {
        let mut bytes = valid_ledger();
        for (word, value) in &words {
            bytes[word * 8..word * 8 + 8].copy_from_slice(&value.to_le_bytes());
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Err(e) = map_bytes(&bytes) {
            prop_assert!(matches!(e, LedgerError::Invalid { .. } | LedgerError::Foreign { .. }), "{e}");
            prop_assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn random_files_are_not_ledgers(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
        let e = map_bytes(&bytes).expect_err("random bytes are not a ledger");
        prop_assert!(matches!(e, LedgerError::Foreign { .. }), "{e}");
    }
}
