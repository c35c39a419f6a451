//! Clients that hold connections without finishing requests: silent sockets,
//! heads and bodies trickled in a line at a time, idle keep-alives. Each is
//! cut at its deadline, so that no number of them locks other clients out or
//! keeps SIGTERM from ending the process; and the connection cap follows the
//! open-file limit.

use std::time::{Duration, Instant};

use gavel_actors::node::NodeSettings;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Backend, HasApi, ServerProcess, TestApp, client, eventually, free_port};
use crate::ws_client::WsClient;

/// Longer than any deadline these tests set; a connection still open then was never cut.
const WAIT: Duration = Duration::from_secs(10);

async fn app_with(adjust: impl FnOnce(&mut gavel::config::Config)) -> TestApp {
    TestApp::spawn_with(Backend::Sqlite, adjust, NodeSettings::default()).await
}

fn address_of(app: &TestApp) -> String {
    app.address.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (or resets it); what it sent
/// first. Fails the test if it is still open after `WAIT`.
async fn until_closed(socket: &mut TcpStream, what: &str) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buffer = [0u8; 4096];
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(count) => received.extend_from_slice(&buffer[..count]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{what}: the connection is still open after {WAIT:?}");
    String::from_utf8_lossy(&received).into_owned()
}

/// Sends a request head one line at a time, `pause` apart, for as long as the
/// server takes it; how many lines it took before it cut the connection.
async fn trickle_head(socket: &mut TcpStream, pause: Duration, lines: usize) -> usize {
    for line in 0..lines {
        let text = if line == 0 { "GET /health HTTP/1.1\r\n".to_owned() } else { format!("X-Line-{line}: slow\r\n") };
        if socket.write_all(text.as_bytes()).await.is_err() {
            return line;
        }
        // A closed connection shows on the read side first.
        let mut probe = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(pause, socket.read(&mut probe)).await {
            return line;
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_trickling_and_idle_connections_are_cut_at_the_head_deadline() {
    let app = app_with(|config| config.http_head_timeout_secs = 1).await;
    let address = address_of(&app);

    // A connection that never says anything.
    let mut silent = TcpStream::connect(&address).await.unwrap();
    let said = until_closed(&mut silent, "a silent connection").await;
    assert!(said.is_empty() || said.starts_with("HTTP/1.1 408"), "{said}");

    // A head sent a line every 200 ms: cut after about a second, far short of its 50 lines.
    let mut slow = TcpStream::connect(&address).await.unwrap();
    let taken = trickle_head(&mut slow, Duration::from_millis(200), 50).await;
    assert!(taken < 50, "a head trickled in over 10 s was taken whole");

    // A keep-alive connection left idle after its response.
    let mut idle = TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: gavel\r\n\r\n").await.unwrap();
    let said = until_closed(&mut idle, "an idle keep-alive connection").await;
    assert!(said.starts_with("HTTP/1.1 200"), "its request was answered first: {said}");

    // Everyone else is served all along.
    let (status, _) = app.api().get("/health", None).await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_at_a_small_cap_do_not_lock_everyone_out() {
    let app = app_with(|config| {
        config.max_connections = Some(3);
        config.http_head_timeout_secs = 1;
    })
    .await;
    let address = address_of(&app);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(&address).await.unwrap());
    }
    // The cap is taken by sockets that say nothing; they are cut at the head
    // deadline, and the next client is served.
    let started = Instant::now();
    let response = tokio::time::timeout(WAIT, client().get(app.url("/health")).send())
        .await
        .expect("served once the idle sockets are cut")
        .expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() < WAIT);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_gets_408_and_the_connection_closes() {
    let app = app_with(|config| config.http_body_timeout_secs = 1).await;
    let mut socket = TcpStream::connect(address_of(&app)).await.unwrap();
    socket
        .write_all(b"POST /api/v1/auth/login HTTP/1.1\r\nHost: gavel\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"username\":")
        .await
        .unwrap();
    let said = until_closed(&mut socket, "a connection whose body stopped").await;
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("\"REQUEST_TIMEOUT\""), "{said}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_process_within_the_shutdown_timeout_whatever_the_clients_do() {
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Deadlines far beyond the test, so that only the shutdown's own bound can end it.
    let flags: Vec<String> =
        ["--shutdown-timeout-secs", "2", "--http-head-timeout-secs", "600", "--http-body-timeout-secs", "600"]
            .map(str::to_owned)
            .to_vec();
    let server = ServerProcess::start_with(data_dir.path(), None, port, &flags).await;
    let address = server.address.trim_start_matches("http://").to_owned();

    // A head trickling in, a body that stopped halfway, and a WebSocket watcher.
    let mut slow_head = TcpStream::connect(&address).await.unwrap();
    let trickler = tokio::spawn(async move { trickle_head(&mut slow_head, Duration::from_millis(200), 1_000).await });
    let mut stalled_body = TcpStream::connect(&address).await.unwrap();
    stalled_body
        .write_all(b"POST /api/v1/auth/login HTTP/1.1\r\nHost: gavel\r\nContent-Length: 100\r\n\r\n{\"user")
        .await
        .unwrap();
    let _watcher = WsClient::connect(&server.address, None).await;
    // All three held open by the node (and the scrape's own connection).
    eventually(WAIT, "the node to hold the three connections", || async {
        (crate::cluster::labelled_metric(&server.address, "gavel_http_connections").await >= 4.0).then_some(())
    })
    .await;

    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let mut child = server.child;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the process ends within 20 s of SIGTERM though its clients do not finish")
        .unwrap();
    assert!(status.success(), "a clean exit: {status}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    let taken = tokio::time::timeout(WAIT, trickler).await.expect("the trickling client was cut").unwrap();
    assert!(taken < 1_000);
}

/// The open-file limits of a process: (soft, hard).
fn open_file_limits(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|word| word.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_connection_cap_follows_the_open_file_limit_raised_to_its_hard_limit() {
    // Start the node with a low soft limit, as most systems do (it inherits this test's).
    let (_, hard) = open_file_limits(std::process::id() as i32);
    let low = libc::rlimit { rlim_cur: 256.min(hard), rlim_max: hard };
    // SAFETY: setrlimit only reads the struct; this test process runs alone (nextest).
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    let data_dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(data_dir.path(), None, free_port(), &[]).await;

    let (soft, node_hard) = open_file_limits(server.pid());
    assert_eq!((soft, node_hard), (hard, hard), "the node raised its soft limit to the hard one");
    let metrics = client().get(format!("{}/metrics", server.address)).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .map(|value| value.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or_else(|| panic!("{name} in /metrics"))
    };
    let cap = value("gavel_http_connections_max");
    assert_eq!(cap, hard.saturating_sub(512).max(hard / 2), "the cap leaves 512 descriptors to the rest");
    assert!(value("gavel_http_connections") >= 1, "the scrape's own connection is counted");
    server.terminate().await;
}
