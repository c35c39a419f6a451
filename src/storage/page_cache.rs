//! SQLite's own page cache, with the end of each write transaction made cheap
//! for a large cache.
//!
//! When a write transaction ends, SQLite drops from the connection's page
//! cache every page past the end of the database (`xTruncate`). The cache
//! keeps the largest page number it ever held, and when that is further past
//! the end than the cache has hash buckets, it scans every bucket and every
//! page in it. A B-tree rebalance that swaps two pages' numbers parks one of
//! them for a moment at the locking page's number (page 1,048,577 with 1 KiB
//! pages, far past the end of any of our databases), so after nearly every
//! commit of many auctions that scan ran over the writer's whole cache: some
//! 16,000 buckets and 9,500 pages, 3.5-7.6% of the node's time in
//! `pcache1TruncateUnsafe` (`many_auctions`, `perf record`).
//!
//! This module installs SQLite's default cache behind a thin wrapper that
//! knows, conservatively, the largest page number each cache may still hold:
//! a page enters a cache only by `xFetch` with a create flag or by `xRekey`,
//! and the number parked at the locking page is tracked apart (the rebalance
//! moves it on at once). A truncation that cannot find anything, because no
//! page at or past its limit can be there, is not passed on; every other call
//! is the default cache's own.

use std::ffi::{c_int, c_uint};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libsqlite3_sys as ffi;

/// Where SQLite's locking byte lies (its `PENDING_BYTE`, which only its
/// test builds move): the page holding it is never used for data, and a
/// rebalance uses its number as a parking place.
const PENDING_BYTE: u64 = 0x4000_0000;

/// The default cache's methods, taken before SQLite starts.
static INNER: OnceLock<Methods> = OnceLock::new();

/// A methods struct, kept once and only read afterwards.
struct Methods(ffi::sqlite3_pcache_methods2);

// SAFETY: the struct is function pointers and the default cache's `pArg`
// (null in SQLite's own), never written after it is kept; SQLite's caches
// may be used from any thread.
unsafe impl Send for Methods {}
// SAFETY: as above: shared only for reading.
unsafe impl Sync for Methods {}

/// Truncations that could find nothing and were not passed on.
static SKIPPED: AtomicU64 = AtomicU64::new(0);
/// Truncations passed on to the default cache.
static PASSED: AtomicU64 = AtomicU64::new(0);

/// (truncations skipped, truncations passed on) since start.
#[cfg(test)]
pub(super) fn truncation_counts() -> (u64, u64) {
    (SKIPPED.load(Ordering::Relaxed), PASSED.load(Ordering::Relaxed))
}

/// Installs the wrapper, once per process. SQLite takes a page cache only
/// before it starts; if something in the process started it already, the
/// default cache stays (slower at the end of a transaction, the same
/// otherwise) and a warning says so.
pub(super) fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        if let Err(code) = configure() {
            tracing::warn!(code, "SQLite had started before its page cache was set; the default one is used");
        }
    });
}

fn configure() -> Result<(), c_int> {
    let mut inner = ffi::sqlite3_pcache_methods2 {
        iVersion: 0,
        pArg: std::ptr::null_mut(),
        xInit: None,
        xShutdown: None,
        xCreate: None,
        xCachesize: None,
        xPagecount: None,
        xFetch: None,
        xUnpin: None,
        xRekey: None,
        xTruncate: None,
        xDestroy: None,
        xShrink: None,
    };
    // SAFETY: both calls take a pointer to a methods struct, which SQLite
    // fills (GET) or copies (SET); they fail with SQLITE_MISUSE once SQLite
    // has started, and then change nothing.
    unsafe {
        let code = ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, &mut inner as *mut ffi::sqlite3_pcache_methods2);
        if code != ffi::SQLITE_OK {
            return Err(code);
        }
        if inner.xCreate.is_none() || inner.iVersion < 1 {
            return Err(ffi::SQLITE_ERROR);
        }
        let inner = &INNER.get_or_init(|| Methods(inner)).0;
        let wrapper = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: inner.pArg,
            xInit: inner.xInit,
            xShutdown: inner.xShutdown,
            xCreate: Some(create),
            xCachesize: Some(cache_size),
            xPagecount: Some(page_count),
            xFetch: Some(fetch),
            xUnpin: Some(unpin),
            xRekey: Some(rekey),
            xTruncate: Some(truncate),
            xDestroy: Some(destroy),
            xShrink: Some(shrink),
        };
        match ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &wrapper as *const ffi::sqlite3_pcache_methods2) {
            ffi::SQLITE_OK => Ok(()),
            code => Err(code),
        }
    }
}

/// One cache: the default cache's, and what may be in it.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The locking page's number for this cache's page size.
    parking: c_uint,
    /// No page numbered above this is in the cache, except at `parking`.
    max_key: c_uint,
    /// A page may be at `parking`.
    parked: bool,
}

impl Cache {
    /// Whether some page numbered `limit` or more may be in the cache.
    fn may_hold_from(&self, limit: c_uint) -> bool {
        limit == 0 || self.max_key >= limit || (self.parked && self.parking >= limit)
    }

    fn entered(&mut self, key: c_uint) {
        if key == self.parking {
            self.parked = true;
        } else {
            self.max_key = self.max_key.max(key);
        }
    }
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    &INNER.get().expect("the wrapper is installed only after the default cache is kept").0
}

/// # Safety
/// `cache` is a handle `create` returned and `destroy` has not freed. SQLite
/// calls one cache's methods from one thread at a time (a cache belongs to
/// one connection's pager).
unsafe fn cache<'a>(cache: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    // SAFETY: as the caller promises.
    unsafe { &mut *cache.cast::<Cache>() }
}

unsafe extern "C" fn create(page_size: c_int, extra_size: c_int, purgeable: c_int) -> *mut ffi::sqlite3_pcache {
    // SAFETY: the default cache's own `xCreate`, with SQLite's arguments.
    let made = unsafe { (inner().xCreate.expect("checked at install"))(page_size, extra_size, purgeable) };
    if made.is_null() {
        return made;
    }
    let page_size = u64::try_from(page_size).unwrap_or(1).max(1);
    let parking = c_uint::try_from(PENDING_BYTE / page_size + 1).unwrap_or(c_uint::MAX);
    let wrapped = Box::new(Cache { inner: made, parking, max_key: 0, parked: false });
    Box::into_raw(wrapped).cast::<ffi::sqlite3_pcache>()
}

unsafe extern "C" fn cache_size(handle: *mut ffi::sqlite3_pcache, pages: c_int) {
    // SAFETY: SQLite passes a live handle of ours.
    unsafe {
        let cache = cache(handle);
        if let Some(method) = inner().xCachesize {
            method(cache.inner, pages);
        }
    }
}

unsafe extern "C" fn page_count(handle: *mut ffi::sqlite3_pcache) -> c_int {
    // SAFETY: SQLite passes a live handle of ours.
    unsafe {
        let cache = cache(handle);
        inner().xPagecount.map_or(0, |method| method(cache.inner))
    }
}

unsafe extern "C" fn fetch(
    handle: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    // SAFETY: SQLite passes a live handle of ours.
    unsafe {
        let cache = cache(handle);
        if create != 0 {
            // Whether or not a page is made: counting it too is only cautious.
            cache.entered(key);
        }
        (inner().xFetch.expect("a page cache fetches"))(cache.inner, key, create)
    }
}

unsafe extern "C" fn unpin(handle: *mut ffi::sqlite3_pcache, page: *mut ffi::sqlite3_pcache_page, discard: c_int) {
    // SAFETY: SQLite passes a live handle of ours and one of its pages.
    unsafe {
        let cache = cache(handle);
        (inner().xUnpin.expect("a page cache unpins"))(cache.inner, page, discard);
    }
}

unsafe extern "C" fn rekey(
    handle: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old_key: c_uint,
    new_key: c_uint,
) {
    // SAFETY: SQLite passes a live handle of ours and one of its pages.
    unsafe {
        let cache = cache(handle);
        (inner().xRekey.expect("a page cache renumbers"))(cache.inner, page, old_key, new_key);
        // A key holds one page: the one at `parking` has moved on.
        if old_key == cache.parking {
            cache.parked = false;
        }
        cache.entered(new_key);
    }
}

unsafe extern "C" fn truncate(handle: *mut ffi::sqlite3_pcache, limit: c_uint) {
    // SAFETY: SQLite passes a live handle of ours.
    unsafe {
        let cache = cache(handle);
        if !cache.may_hold_from(limit) {
            SKIPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        PASSED.fetch_add(1, Ordering::Relaxed);
        (inner().xTruncate.expect("a page cache truncates"))(cache.inner, limit);
        // Nothing numbered `limit` or more is left.
        if limit > 0 {
            cache.max_key = cache.max_key.min(limit - 1);
        }
        if cache.parking >= limit {
            cache.parked = false;
        }
    }
}

unsafe extern "C" fn destroy(handle: *mut ffi::sqlite3_pcache) {
    // SAFETY: SQLite destroys a cache once and never uses the handle again.
    unsafe {
        let cache = Box::from_raw(handle.cast::<Cache>());
        (inner().xDestroy.expect("a page cache is destroyed"))(cache.inner);
    }
}

unsafe extern "C" fn shrink(handle: *mut ffi::sqlite3_pcache) {
    // SAFETY: SQLite passes a live handle of ours.
    unsafe {
        let cache = cache(handle);
        if let Some(method) = inner().xShrink {
            method(cache.inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use sqlx::{ConnectOptions, Connection};

    use libsqlite3_sys as ffi;

    use super::{Cache, truncation_counts};
    use crate::storage::wal_writes::tests::{commit_scattered_rows, store_with_a_table, writer};

    fn cache() -> Cache {
        // The locking page's number with 1 KiB pages.
        Cache { inner: std::ptr::null_mut(), parking: 1_048_577, max_key: 0, parked: false }
    }

    #[test]
    fn a_page_parked_at_the_locking_page_counts_until_it_moves_on() {
        let mut cache = cache();
        for key in [3, 9, 7] {
            cache.entered(key);
        }
        assert!(cache.may_hold_from(9));
        assert!(!cache.may_hold_from(10), "nothing past page 9 came in");
        // A rebalance swapping pages 4 and 8 parks one at the locking page.
        cache.entered(cache.parking);
        assert!(cache.may_hold_from(10), "a page is parked far past the end");
        assert!(!cache.may_hold_from(cache.parking + 1));
        assert_eq!(cache.max_key, 9, "the parking place is not a page of the database");
        // Truncating from 0 empties any cache.
        assert!(cache.may_hold_from(0));
        let mut empty = Cache { parked: false, max_key: 0, ..cache };
        assert!(empty.may_hold_from(0));
        empty.entered(1);
        assert!(!empty.may_hold_from(2));
    }

    /// The wrapper around SQLite's own cache, driven as a pager drives it: a
    /// truncation that may find a page is passed on and drops every page at
    /// or past its limit, the parked one too; one that cannot is skipped.
    #[test]
    fn a_truncation_drops_every_page_at_or_past_its_limit_and_only_a_futile_one_is_skipped() {
        super::install();
        // SAFETY: the wrapper's methods, called as SQLite calls them: on a
        // cache they made, one thread, pages fetched before they are renumbered
        // or unpinned.
        unsafe {
            assert_eq!(ffi::sqlite3_initialize(), ffi::SQLITE_OK);
            let handle = super::create(1024, 64, 1);
            assert!(!handle.is_null());
            // Room for the pages once unpinned (a new cache keeps none).
            super::cache_size(handle, 100);
            let parking = super::cache(handle).parking;
            let present = |key| {
                let page = super::fetch(handle, key, 0);
                if !page.is_null() {
                    super::unpin(handle, page, 0);
                }
                !page.is_null()
            };
            for key in [1, 2, 5, 40] {
                let page = super::fetch(handle, key, 2);
                assert!(!page.is_null());
                if key == 5 {
                    super::rekey(handle, page, 5, parking);
                }
                super::unpin(handle, page, 0);
            }
            assert!(present(parking), "page 5 is parked");
            assert!(!present(5));

            let (skipped, passed) = truncation_counts();
            super::truncate(handle, 41);
            assert_eq!(truncation_counts(), (skipped, passed + 1), "a page is parked past the end");
            assert!(present(40) && !present(parking), "the parked page is dropped, the rest stay");

            super::truncate(handle, 41);
            assert_eq!(truncation_counts(), (skipped + 1, passed + 1), "nothing is left past page 40");

            super::truncate(handle, 3);
            assert_eq!(truncation_counts(), (skipped + 1, passed + 2));
            assert!(present(1) && present(2) && !present(40));

            super::destroy(handle);
        }
    }

    /// Commits of rows at scattered places split and rebalance the table's
    /// B-tree, which parks pages at the locking page's number: the truncation
    /// at the end of each commit still finds nothing past the end, and is not
    /// passed on to a scan of the whole cache.
    #[tokio::test]
    async fn the_end_of_a_commit_that_rebalanced_the_tree_does_not_scan_the_cache() {
        let (_dir, db) = store_with_a_table().await;
        let pool = writer(&db);
        commit_scattered_rows(pool, 0).await;
        let (skipped_before, _) = truncation_counts();
        for round in 1..=20 {
            commit_scattered_rows(pool, round).await;
        }
        let (skipped, _) = truncation_counts();
        assert!(skipped - skipped_before >= 20, "{} truncations skipped in 20 commits", skipped - skipped_before);
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check").fetch_one(pool).await.unwrap();
        assert_eq!(integrity, "ok");
        db.close().await;
    }

    /// A transaction that grew the database and was rolled back may leave
    /// pages past the end in the cache: the truncation at its end is passed
    /// on to the default cache. The transactions after it, which grow the
    /// database over the same page numbers, leave every row as written, seen
    /// by the writer (through its cache) and by a connection of its own.
    #[tokio::test]
    async fn a_rolled_back_growth_leaves_no_page_behind_in_the_cache() {
        let (dir, db) = store_with_a_table().await;
        let pool = writer(&db);
        commit_scattered_rows(pool, 0).await;
        let (_, passed_before) = truncation_counts();
        for round in 1..=5_i64 {
            let mut doomed = pool.begin().await.unwrap();
            for row in 0..400_i64 {
                sqlx::query("INSERT INTO scattered (key, round, body) VALUES (?, ?, ?)")
                    .bind(2_000_000 + round * 1_000 + row)
                    .bind(-round)
                    .bind(vec![0xdd_u8; 900])
                    .execute(&mut *doomed)
                    .await
                    .unwrap();
            }
            doomed.rollback().await.unwrap();
            commit_scattered_rows(pool, round).await;
        }
        let (_, passed) = truncation_counts();
        assert!(passed - passed_before >= 5, "{} truncations passed on after 5 rollbacks", passed - passed_before);
        let summary = "SELECT count(*), sum(key * round), sum(length(body)), min(round) FROM scattered";
        let through_cache: (i64, i64, i64, i64) = sqlx::query_as(summary).fetch_one(pool).await.unwrap();
        assert_eq!(through_cache.3, 0, "no rolled-back row is seen");
        let bodies: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT round, body FROM scattered").fetch_all(pool).await.unwrap();
        for (round, body) in &bodies {
            assert_eq!(*body, vec![u8::try_from(round % 251).unwrap(); 600], "a row of round {round}");
        }
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check").fetch_one(pool).await.unwrap();
        assert_eq!(integrity, "ok");
        let mut other = SqliteConnectOptions::new()
            .filename(dir.path().join("gavel.db"))
            .journal_mode(SqliteJournalMode::Wal)
            .read_only(true)
            .connect()
            .await
            .unwrap();
        let seen: (i64, i64, i64, i64) = sqlx::query_as(summary).fetch_one(&mut other).await.unwrap();
        assert_eq!(seen, through_cache);
        other.close().await.unwrap();
        db.close().await;
    }
}
