//! WebSocket scenarios over raw sockets (a hand-written client: the load
//! generator must cost far less than the server it measures).
//!
//! `ws_fanout`: W watchers subscribe to one auction while bids arrive at a
//! fixed rate over HTTP. A few "probe" watchers decode every frame and time
//! each `bid` event from its `placed_at` (set when the auction's actor applied
//! the bid, before the commit) to its arrival: an upper bound of commit →
//! delivery. The other watchers read and discard, as fast as they can.
//!
//! `ws_idle`: opens N WebSocket connections that do nothing, and reports the
//! server's resident memory before and after (`--server-pid`).

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a WebSocket on `/ws` by hand: the upgrade request, then the 101.
/// With `deflate`, it offers `permessage-deflate` as browsers do and insists
/// that the server takes it.
pub async fn open(target: SocketAddr, source: Option<IpAddr>, deflate: bool) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let mut stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    let offer = if deflate { "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" } else { "" };
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 || head.len() > 4096 {
            return Err(io::Error::other("no upgrade response"));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 101") {
        return Err(io::Error::other(head));
    }
    if deflate && !head.contains("sec-websocket-extensions: permessage-deflate") {
        return Err(io::Error::other(format!("the server did not take permessage-deflate: {head}")));
    }
    Ok(stream)
}

/// A client text frame (clients must mask; a zero key leaves the bytes as they are).
pub fn text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mut frame = vec![0x81];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// Splits complete server frames (unmasked) off the front of `buffer`: the
/// first byte (FIN, RSV1 for a compressed message, opcode) and the payload.
fn next_frame(buffer: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if buffer.len() < 2 {
        return None;
    }
    let first = buffer[0];
    let (length, header) = match buffer[1] & 0x7f {
        126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
        127 if buffer.len() >= 10 => (u64::from_be_bytes(buffer[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        short => (short as usize, 2),
    };
    if buffer.len() < header + length {
        return None;
    }
    let payload = buffer[header..header + length].to_vec();
    buffer.drain(..header + length);
    Some((first, payload))
}

/// The wall clock in microseconds (comparable across this process's threads).
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_micros() as i64)
}

/// `2026-11-22T10:00:00.123Z` → milliseconds since the epoch.
fn parse_timestamp(text: &str) -> Option<i64> {
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second, millis) = (number(11..13)?, number(14..16)?, number(17..19)?, number(20..23)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1_000 + millis)
}

thread_local! {
    /// One read buffer for every discarding watcher (the runtime has one thread).
    static DISCARD: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
}

#[derive(Default)]
pub struct FanoutTotals {
    pub bytes: AtomicU64,
    pub closed: AtomicU64,
}

/// Reads and throws away everything, counting bytes, until the socket closes.
pub async fn discard(stream: TcpStream, totals: Arc<FanoutTotals>) {
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        let read = DISCARD.with(|buffer| stream.try_read(&mut buffer.borrow_mut()));
        match read {
            Ok(0) => break,
            Ok(bytes) => {
                totals.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => break,
        }
    }
    totals.closed.fetch_add(1, Ordering::Relaxed);
}

pub struct ProbeReport {
    pub latency: Histogram<u64>,
    pub events: u64,
    pub snapshots: u64,
    pub gaps: u64,
    pub last_seq: u64,
    /// When each bid's frame was read (wall clock, microseconds).
    pub arrivals_us: Vec<(u64, i64)>,
}

/// What a probe reads of a message: borrowed, every other field skipped, so
/// that the probes cost the load generator little.
#[derive(serde::Deserialize)]
struct ProbedMessage<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    seq: Option<u64>,
    placed_at: Option<&'a str>,
    auction: Option<ProbedAuction>,
}

#[derive(serde::Deserialize)]
struct ProbedAuction {
    seq: u64,
}

/// Decodes every frame, timing each bid from `placed_at` to now, until it has
/// seen bid `last` (0 while unknown), or 10 s after `last` became known.
/// Compressed messages are inflated as a browser does: one window, kept from
/// each compressed message to the next.
pub async fn probe(mut stream: TcpStream, last: Arc<AtomicU64>) -> ProbeReport {
    let mut inflater = flate2::Decompress::new(false);
    let mut inflated = Vec::with_capacity(64 * 1024);
    let mut report = ProbeReport {
        latency: Histogram::new_with_bounds(1, 600_000, 3).expect("histogram bounds"),
        events: 0,
        snapshots: 0,
        gaps: 0,
        last_seq: 0,
        arrivals_us: Vec::new(),
    };
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut last_known_at: Option<Instant> = None;
    loop {
        let last = last.load(Ordering::Relaxed);
        if last > 0 {
            let known_at = *last_known_at.get_or_insert_with(Instant::now);
            if report.last_seq >= last || known_at.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        let read = match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => read,
            Ok(_) => break,
            Err(_) => continue,
        };
        let arrived_us = now_us();
        let arrived = arrived_us / 1000;
        buffer.extend_from_slice(&chunk[..read]);
        while let Some((first, mut payload)) = next_frame(&mut buffer) {
            if first & 0x0f != 0x1 {
                continue;
            }
            if first & 0x40 != 0 {
                payload.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
                inflated.clear();
                inflated.reserve(64 * 1024);
                if inflater.decompress_vec(&payload, &mut inflated, flate2::FlushDecompress::Sync).is_err() {
                    report.gaps += 1;
                    continue;
                }
                std::mem::swap(&mut payload, &mut inflated);
            }
            let Ok(message) = serde_json::from_slice::<ProbedMessage<'_>>(&payload) else { continue };
            match message.kind {
                "snapshot" => {
                    report.snapshots += 1;
                    report.last_seq = message.auction.map_or(0, |auction| auction.seq);
                }
                "bid" => {
                    let seq = message.seq.unwrap_or(0);
                    if seq != report.last_seq + 1 {
                        report.gaps += 1;
                    }
                    report.last_seq = seq;
                    report.events += 1;
                    report.arrivals_us.push((seq, arrived_us));
                    if let Some(placed) = message.placed_at.and_then(parse_timestamp) {
                        report.latency.record((arrived - placed).max(0) as u64 * 1000).ok();
                    }
                }
                _ => {}
            }
        }
    }
    report
}

/// Subscribes a fresh connection to `auction_id`.
pub async fn watcher(
    target: SocketAddr,
    source: Option<IpAddr>,
    auction_id: &str,
    deflate: bool,
) -> io::Result<TcpStream> {
    let mut stream = open(target, source, deflate).await?;
    let subscribe = format!("{{\"type\":\"subscribe\",\"auction_id\":\"{auction_id}\"}}");
    stream.write_all(&text_frame(&subscribe)).await?;
    Ok(stream)
}

/// Source addresses to spread many connections over (each has its own
/// ephemeral port range): 127.0.0.1, 127.0.0.2, …
pub fn source_for(index: usize) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (index / 20_000) as u8)))
}

/// Raises this process's open-file limit to at least `wanted`.
pub fn raise_open_files(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur >= wanted {
            return;
        }
        limit.rlim_cur = wanted;
        limit.rlim_max = limit.rlim_max.max(wanted);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            eprintln!("could not raise the open-file limit to {wanted}; run as root or raise `ulimit -n`");
        }
    }
}

pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens `count` idle connections, holds them, and reports memory.
pub async fn idle(target: SocketAddr, count: usize, server_pid: Option<u32>, hold: Duration, deflate: bool) {
    raise_open_files(count as u64 + 1_024);
    let before = server_pid.and_then(resident_kib);
    let started = Instant::now();
    let mut streams = Vec::with_capacity(count);
    let mut failures = 0u64;
    for batch in (0..count).collect::<Vec<_>>().chunks(500) {
        let attempts: Vec<_> =
            batch.iter().map(|index| tokio::spawn(open(target, source_for(*index), deflate))).collect();
        for attempt in attempts {
            match attempt.await {
                Ok(Ok(stream)) => {
                    streams.push(stream);
                }
                Ok(Err(error)) => {
                    failures += 1;
                    if failures <= 3 {
                        eprintln!("open failed: {error}");
                    }
                }
                Err(_) => failures += 1,
            }
        }
    }
    let open_time = started.elapsed();
    tokio::time::sleep(hold).await;
    let after = server_pid.and_then(resident_kib);
    println!(
        "scenario ws_idle: {} connections open ({failures} failed) in {:.1} s",
        streams.len(),
        open_time.as_secs_f64()
    );
    if let (Some(before), Some(after)) = (before, after) {
        let per_connection = (after.saturating_sub(before) * 1024) as f64 / streams.len().max(1) as f64;
        println!(
            "  server resident memory: {:.1} MiB before, {:.1} MiB with them open ({per_connection:.0} bytes each)",
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
    }
    drop(streams);
}
