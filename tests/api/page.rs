//! The bidder web page: served from the binary (no network, no build step),
//! and used by three people in a real browser (tests/browser/page.test.mjs:
//! Debian's Chromium driven by playwright-core). scripts/test installs both.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH};

use crate::helpers::{Backend, HasApi, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let app = TestApp::spawn(Backend::Sqlite).await;

    let home = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(home.status(), StatusCode::OK);
    assert_eq!(home.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    assert!(home.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
    let html = home.text().await.unwrap();
    let version = html
        .split("/assets/app.js?v=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page names its script with a version")
        .to_owned();
    assert_eq!(version.len(), 16, "{version}");
    assert!(html.contains(&format!("/assets/app.css?v={version}")));

    // The shareable link of an auction is the same page; a path that cannot
    // be an auction is a 404 that still shows the page (which says so).
    let shared = app.client.get(app.url("/auctions/01a2022e-d52b-7635-8d26-ce5e879f8e42")).send().await.unwrap();
    assert_eq!(shared.status(), StatusCode::OK);
    assert_eq!(shared.text().await.unwrap(), html);
    let bad = app.client.get(app.url("/auctions/not-an-id")).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::NOT_FOUND);
    assert_eq!(bad.headers()[CONTENT_TYPE], "text/html; charset=utf-8");

    for (path, content_type, marker) in [
        ("/assets/app.js", "text/javascript; charset=utf-8", "class Live"),
        ("/assets/app.css", "text/css; charset=utf-8", ".auction-item"),
    ] {
        let versioned = app.client.get(app.url(&format!("{path}?v={version}"))).send().await.unwrap();
        assert_eq!(versioned.status(), StatusCode::OK, "{path}");
        assert_eq!(versioned.headers()[CONTENT_TYPE], content_type);
        assert_eq!(versioned.headers()[CACHE_CONTROL], "public, max-age=31536000, immutable");
        let etag = versioned.headers()[ETAG].clone();
        assert!(versioned.text().await.unwrap().contains(marker), "{path}");

        // Another version (an old page) is not cached for good, and a
        // revalidation with the current tag costs no body.
        let stale = app.client.get(app.url(&format!("{path}?v=0"))).send().await.unwrap();
        assert_eq!(stale.headers()[CACHE_CONTROL], "no-cache");
        let revalidated = app.client.get(app.url(path)).header(IF_NONE_MATCH, etag).send().await.unwrap();
        assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert!(revalidated.bytes().await.unwrap().is_empty());
    }

    // The API's own 404 is unchanged.
    let (status, body) = app.api().get("/api/v1/nowhere", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    app.stop().await;
}

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_people_bid_in_a_real_browser() {
    let dir = browser_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run scripts/test (or `npm ci` in tests/browser)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no Chromium at {chromium}: run scripts/test (or apt-get install chromium)"
    );
    let app = TestApp::spawn(Backend::Sqlite).await;
    let screenshots = std::env::var("GAVEL_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| app.data_dir.path().join("screenshots"));

    let run = tokio::process::Command::new("node")
        .arg("page.test.mjs")
        .current_dir(&dir)
        .env("GAVEL_URL", &app.address)
        .env("SCREENSHOT_DIR", &screenshots)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test finishes within 4 minutes")
        .expect("node runs (install Node.js)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser test failed ({}); screenshots in {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status,
        screenshots.display()
    );
    println!("{stdout}");
    for name in ["01-home", "02-auction", "03-phone", "04-won", "05-create", "06-phone-ended"] {
        assert!(screenshots.join(format!("{name}.png")).is_file(), "screenshot {name}");
    }

    // What the people saw is what the store holds.
    let (status, ended) = app.api().get("/api/v1/auctions?status=ended", None).await;
    assert_eq!(status, StatusCode::OK);
    let items = ended["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{ended}");
    let auction = &items[0];
    assert_eq!(auction["seller"]["username"], "sally");
    assert_eq!(auction["winner"]["username"], "alice");
    assert_eq!(auction["final_price"], 13500);
    assert_eq!(auction["currency"], "EUR");
    assert_eq!(auction["bid_count"], 5);
    let history = app.api().history(auction["id"].as_str().unwrap()).await;
    let prices: Vec<i64> = history.iter().map(|bid| bid["current_price"].as_i64().unwrap()).collect();
    assert_eq!(prices, [10000, 11000, 12000, 12000, 13500]);
    let amounts: Vec<i64> = history.iter().map(|bid| bid["amount"].as_i64().unwrap()).collect();
    assert_eq!(amounts, [10000, 11000, 11500, 12500, 13000], "typed decimals arrived as minor units");
    app.stop().await;
}
