//! A SQLite VFS that gathers a commit's writes to the WAL into a few large writes.
//!
//! SQLite writes each WAL frame in two calls, its 24-byte header and then the
//! page, straight to the file. A commit of many auctions changes some 110
//! pages, so it made 227 `pwrite`s, one after another on the serial commit
//! path (`many_auctions`, `perf stat --per-thread` on the node's writer
//! thread; 4 with this VFS). This VFS is the platform's own (unix) VFS with
//! one change: a write to a WAL file that continues the write before it joins
//! a buffer, and the buffer goes to the file, 64 KiB a call, before any other
//! call on that file: a sync, a read, a size query, a truncation, a lock, a
//! file control, a mapping, closing it. Every other file (the database, its
//! shared memory, temporary files) is the unix VFS's own, untouched.
//!
//! With `synchronous=FULL`, which `Db::open_sqlite` sets with this VFS, a
//! commit syncs the WAL before it publishes its frames to other connections
//! (in the shared-memory index, which the WAL file's handle does not touch),
//! so the sync has written them first. Nothing changes in what reaches the
//! disk or when a commit is durable: the same bytes at the same offsets, in
//! the same order, all of them before the sync that ends the commit. A write
//! that fails is reported by the call that issues it (a sync, for a commit),
//! and SQLite then treats the transaction as failed, as it would a failed
//! write. (With a weaker setting the WAL is not synced at each commit, and a
//! reader could see frames still in the buffer: this VFS is for `FULL` only.
//! Nor is a WAL buffered whose database has powersafe overwrite turned off:
//! SQLite then pads each commit to a sector and writes part of the padding
//! after the sync.)

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libsqlite3_sys as ffi;

/// The VFS's name, for `SqliteConnectOptions::vfs`.
pub(super) const NAME: &CStr = c"gavel-wal-writes";

/// Writes beyond this are issued at once instead of joining the buffer: a
/// commit's frames are a few hundred KiB, and the buffer keeps its room
/// between commits.
const BUFFER_LIMIT: usize = 1 << 20;

/// WAL writes SQLite asked for, and writes this VFS issued to WAL files.
static ASKED: AtomicU64 = AtomicU64::new(0);
static ISSUED: AtomicU64 = AtomicU64::new(0);

/// (WAL writes SQLite asked for, WAL writes issued to the file) since start.
#[cfg(test)]
pub(super) fn wal_write_counts() -> (u64, u64) {
    (ASKED.load(Ordering::Relaxed), ISSUED.load(Ordering::Relaxed))
}

/// Registers the VFS (once per process; later calls return the first result).
pub(super) fn register() -> Result<&'static str, sqlx::Error> {
    static REGISTERED: OnceLock<Result<(), c_int>> = OnceLock::new();
    let registered = REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find initialises SQLite and returns the default
        // VFS, which lives as long as the process. The VFS made here is leaked,
        // as SQLite requires of a registered VFS, and copies the default's
        // methods, which ignore the VFS passed to them except for `xOpen`
        // (replaced) and `mxPathname` (copied).
        unsafe {
            let inner = ffi::sqlite3_vfs_find(ptr::null());
            if inner.is_null() {
                return Err(ffi::SQLITE_ERROR);
            }
            let inner_size = usize::try_from((*inner).szOsFile).map_err(|_| ffi::SQLITE_ERROR)?;
            let size = c_int::try_from(INNER_OFFSET + inner_size).map_err(|_| ffi::SQLITE_ERROR)?;
            let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
                szOsFile: size,
                pNext: ptr::null_mut(),
                zName: NAME.as_ptr(),
                pAppData: inner.cast::<c_void>(),
                xOpen: Some(open),
                ..*inner
            }));
            match ffi::sqlite3_vfs_register(vfs, 0) {
                ffi::SQLITE_OK => Ok(()),
                code => Err(code),
            }
        }
    });
    match registered {
        Ok(()) => Ok(NAME.to_str().expect("the name is ASCII")),
        Err(code) => Err(sqlx::Error::Configuration(format!("registering SQLite VFS failed: code {code}").into())),
    }
}

/// A WAL file: the handle SQLite sees, then the unix VFS's own handle for it.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    /// Offset in the file of `buffer[0]`.
    start: i64,
    buffer: Vec<u8>,
}

/// Where the unix VFS's handle starts, past ours (8-byte aligned).
const INNER_OFFSET: usize = std::mem::size_of::<WalFile>().next_multiple_of(8);

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: `vfs` is the one `register` made, whose app data is the unix
    // VFS; `file` has room for `WalFile` and the unix handle after it.
    unsafe {
        let inner_vfs = (*vfs).pAppData.cast::<ffi::sqlite3_vfs>();
        let inner_open = (*inner_vfs).xOpen.expect("the default VFS opens files");
        if flags & ffi::SQLITE_OPEN_WAL == 0 || !powersafe_overwrite(name) {
            return inner_open(inner_vfs, name, file, flags, out_flags);
        }
        let wal = file.cast::<WalFile>();
        let inner = file.cast::<u8>().add(INNER_OFFSET).cast::<ffi::sqlite3_file>();
        (*wal).base.pMethods = ptr::null();
        let code = inner_open(inner_vfs, name, inner, flags, out_flags);
        if code != ffi::SQLITE_OK {
            // SQLite will not close a handle whose methods are unset, so the
            // inner one is closed here if it got that far.
            if let Some(close) = (*inner).pMethods.as_ref().and_then(|methods| methods.xClose) {
                close(inner);
            }
            return code;
        }
        ptr::addr_of_mut!((*wal).inner).write(inner);
        ptr::addr_of_mut!((*wal).start).write(0);
        ptr::addr_of_mut!((*wal).buffer).write(Vec::new());
        (*wal).base.pMethods = &WAL_METHODS;
        ffi::SQLITE_OK
    }
}

/// Whether SQLite writes this WAL with powersafe overwrite (the default, and
/// gavel never turns it off): then every byte of a commit is written before
/// the sync that ends it. Without it SQLite pads a commit to a sector and
/// writes the last padding frame's tail after the sync (`walWriteToLog`);
/// held in the buffer, that frame would be published before it was written.
/// Such a WAL is left to the unix VFS as it is.
///
/// # Safety
/// `name` is the filename SQLite passed to `xOpen`.
unsafe fn powersafe_overwrite(name: ffi::sqlite3_filename) -> bool {
    // SAFETY: both read NUL-terminated strings; a WAL's filename carries its
    // database's URI parameters.
    unsafe {
        let compiled = ffi::sqlite3_compileoption_used(c"POWERSAFE_OVERWRITE=0".as_ptr()) == 0;
        ffi::sqlite3_uri_boolean(name, c"psow".as_ptr(), c_int::from(compiled)) != 0
    }
}

/// # Safety
/// `file` is a `WalFile` opened by `open`, not yet closed.
unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    // SAFETY: as the caller promises; SQLite calls a handle's methods from one
    // thread at a time.
    unsafe { &mut *file.cast::<WalFile>() }
}

/// # Safety
/// As for `wal`.
unsafe fn inner_methods(wal: &WalFile) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the unix VFS set the methods when it opened the inner handle.
    unsafe { &*(*wal.inner).pMethods }
}

/// The unix VFS takes at most 128 KiB in one write (it masks the length
/// with `0x1ffff`), so a larger buffer goes in pieces of this size.
const WRITE_LIMIT: usize = 64 << 10;

/// Writes `bytes` at `offset` through the unix VFS, in pieces of at most
/// `WRITE_LIMIT` bytes.
///
/// # Safety
/// As for `wal`.
unsafe fn write_through(wal: &WalFile, bytes: &[u8], offset: i64) -> c_int {
    // SAFETY: each piece is a readable slice of `bytes`.
    unsafe {
        let write = inner_methods(wal).xWrite.expect("the unix VFS writes");
        let mut offset = offset;
        for piece in bytes.chunks(WRITE_LIMIT) {
            ISSUED.fetch_add(1, Ordering::Relaxed);
            let length = c_int::try_from(piece.len()).expect("a piece is at most 64 KiB");
            let code = write(wal.inner, piece.as_ptr().cast::<c_void>(), length, offset);
            if code != ffi::SQLITE_OK {
                return code;
            }
            offset += i64::from(length);
        }
        ffi::SQLITE_OK
    }
}

/// Writes the buffer, if anything is in it.
///
/// # Safety
/// As for `wal`.
unsafe fn flush(wal: &mut WalFile) -> c_int {
    if wal.buffer.is_empty() {
        return ffi::SQLITE_OK;
    }
    // SAFETY: as the caller promises.
    let code = unsafe { write_through(wal, &wal.buffer, wal.start) };
    // A failed write is reported once, here; its bytes belong to a
    // transaction that fails with it.
    wal.buffer.clear();
    code
}

unsafe extern "C" fn wal_write(file: *mut ffi::sqlite3_file, data: *const c_void, amount: c_int, offset: i64) -> c_int {
    // SAFETY: SQLite passes a handle `open` made and `amount` readable bytes.
    unsafe {
        let wal = wal(file);
        ASKED.fetch_add(1, Ordering::Relaxed);
        let Ok(length) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        if length == 0 {
            return ffi::SQLITE_OK;
        }
        let continues = offset == wal.start + wal.buffer.len() as i64;
        if !wal.buffer.is_empty() && continues && wal.buffer.len() + length <= BUFFER_LIMIT {
            wal.buffer.extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), length));
            return ffi::SQLITE_OK;
        }
        let code = flush(wal);
        if code != ffi::SQLITE_OK {
            return code;
        }
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), length);
        if length > BUFFER_LIMIT {
            return write_through(wal, bytes, offset);
        }
        wal.start = offset;
        wal.buffer.extend_from_slice(bytes);
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn wal_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a handle once; its fields are dropped here and the
    // methods unset, so nothing reads them again.
    unsafe {
        let wal = wal(file);
        let flushed = flush(wal);
        let close = inner_methods(wal).xClose.expect("the unix VFS closes");
        let closed = close(wal.inner);
        ptr::drop_in_place(&mut wal.buffer);
        wal.base.pMethods = ptr::null();
        if flushed != ffi::SQLITE_OK { flushed } else { closed }
    }
}

/// A method that flushes the buffer and then does what the unix VFS does.
macro_rules! flush_then {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite passes a handle `open` made.
            unsafe {
                let wal = wal(file);
                let code = flush(wal);
                if code != ffi::SQLITE_OK {
                    return code;
                }
                match inner_methods(wal).$method {
                    Some(method) => method(wal.inner, $($arg),*),
                    None => ffi::SQLITE_MISUSE,
                }
            }
        }
    };
}

flush_then!(wal_read, xRead, (data: *mut c_void, amount: c_int, offset: i64));
flush_then!(wal_truncate, xTruncate, (size: i64));
flush_then!(wal_sync, xSync, (flags: c_int));
flush_then!(wal_file_size, xFileSize, (size: *mut i64));
flush_then!(wal_lock, xLock, (level: c_int));
flush_then!(wal_unlock, xUnlock, (level: c_int));
flush_then!(wal_check_reserved_lock, xCheckReservedLock, (reserved: *mut c_int));
flush_then!(wal_file_control, xFileControl, (op: c_int, argument: *mut c_void));
flush_then!(wal_shm_map, xShmMap, (page: c_int, page_size: c_int, extend: c_int, mapped: *mut *mut c_void));
flush_then!(wal_shm_lock, xShmLock, (offset: c_int, count: c_int, flags: c_int));
flush_then!(wal_shm_unmap, xShmUnmap, (delete: c_int));
flush_then!(wal_fetch, xFetch, (offset: i64, amount: c_int, pointer: *mut *mut c_void));
flush_then!(wal_unfetch, xUnfetch, (offset: i64, pointer: *mut c_void));

unsafe extern "C" fn wal_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite passes a handle `open` made.
    unsafe {
        let wal = wal(file);
        inner_methods(wal).xSectorSize.map_or(4096, |method| method(wal.inner))
    }
}

unsafe extern "C" fn wal_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite passes a handle `open` made.
    unsafe {
        let wal = wal(file);
        inner_methods(wal).xDeviceCharacteristics.map_or(0, |method| method(wal.inner))
    }
}

unsafe extern "C" fn wal_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite passes a handle `open` made. (SQLite calls the barrier on
    // the database's handle, which holds the shared memory, not on the WAL's.)
    unsafe {
        let wal = wal(file);
        if let Some(barrier) = inner_methods(wal).xShmBarrier {
            barrier(wal.inner);
        }
    }
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(wal_close),
    xRead: Some(wal_read),
    xWrite: Some(wal_write),
    xTruncate: Some(wal_truncate),
    xSync: Some(wal_sync),
    xFileSize: Some(wal_file_size),
    xLock: Some(wal_lock),
    xUnlock: Some(wal_unlock),
    xCheckReservedLock: Some(wal_check_reserved_lock),
    xFileControl: Some(wal_file_control),
    xSectorSize: Some(wal_sector_size),
    xDeviceCharacteristics: Some(wal_device_characteristics),
    xShmMap: Some(wal_shm_map),
    xShmLock: Some(wal_shm_lock),
    xShmBarrier: Some(wal_shm_barrier),
    xShmUnmap: Some(wal_shm_unmap),
    xFetch: Some(wal_fetch),
    xUnfetch: Some(wal_unfetch),
};

#[cfg(test)]
pub(super) mod tests {
    use std::ffi::c_int;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::Relaxed;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use sqlx::{ConnectOptions, Connection};

    use super::wal_write_counts;
    use crate::storage::Db;

    /// This VFS holds a commit's WAL writes until SQLite's next call on the
    /// file. That is sound for what SQLite 3.51.3 does (read against its
    /// source): every byte of a commit is written before the sync that ends
    /// it, and the shared-memory index is published after that sync, with
    /// powersafe overwrite (no padding frame written after the sync) and
    /// `synchronous=FULL`. Another SQLite may order these otherwise: read
    /// `walFrames` and `walWriteToLog` of the new one before moving this.
    #[test]
    fn the_bundled_sqlite_is_the_one_this_vfs_was_checked_against() {
        // SAFETY: sqlite3_libversion returns a static NUL-terminated string.
        let version = unsafe { std::ffi::CStr::from_ptr(libsqlite3_sys::sqlite3_libversion()) };
        assert_eq!(version.to_str().unwrap(), "3.51.3", "re-read SQLite's WAL writes before moving this version");
    }

    /// A database opened through this VFS with powersafe overwrite off
    /// (`psow=0`): SQLite pads its commits, and writes part of the padding
    /// after the commit's sync, so its WAL must not be buffered. Its WAL
    /// writes go straight to the unix VFS (none is counted here), and what
    /// it committed reads back whole from a plain connection.
    #[tokio::test]
    async fn a_wal_without_powersafe_overwrite_is_not_buffered() {
        use std::ffi::CString;

        super::register().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("padded.db");
        let uri =
            CString::new(format!("file:{}?psow=0&vfs={}", path.display(), super::NAME.to_str().unwrap())).unwrap();
        let (asked_before, _) = wal_write_counts();
        // SAFETY: plain use of SQLite's C API on a handle this test owns and closes.
        unsafe {
            let mut db = std::ptr::null_mut();
            let flags = libsqlite3_sys::SQLITE_OPEN_READWRITE
                | libsqlite3_sys::SQLITE_OPEN_CREATE
                | libsqlite3_sys::SQLITE_OPEN_URI;
            assert_eq!(libsqlite3_sys::sqlite3_open_v2(uri.as_ptr(), &mut db, flags, std::ptr::null()), 0);
            let sql = c"PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
                        CREATE TABLE padded (key INTEGER PRIMARY KEY, body BLOB NOT NULL); \
                        BEGIN; WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 300) \
                        INSERT INTO padded SELECT k, randomblob(500) FROM n; COMMIT; \
                        INSERT INTO padded VALUES (1000, x'00');";
            let code = libsqlite3_sys::sqlite3_exec(db, sql.as_ptr(), None, std::ptr::null_mut(), std::ptr::null_mut());
            assert_eq!(code, 0, "the commits went through");
            let (asked, _) = wal_write_counts();
            assert_eq!(asked - asked_before, 0, "no WAL write of a padded WAL went through the buffer");
            let plain = SqliteConnectOptions::new().filename(&path).read_only(true);
            let mut reader = plain.connect().await.unwrap();
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM padded").fetch_one(&mut reader).await.unwrap();
            assert_eq!(rows, 301);
            let check: String = sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut reader).await.unwrap();
            assert_eq!(check, "ok");
            reader.close().await.unwrap();
            libsqlite3_sys::sqlite3_close(db);
        }
    }

    pub(in crate::storage) fn writer(db: &Db) -> &sqlx::SqlitePool {
        match db {
            Db::Sqlite { writer, .. } => writer.pool(),
            Db::Postgres { .. } => unreachable!("a SQLite store"),
        }
    }

    /// A store in a new directory, with a table for `commit_scattered_rows`.
    pub(in crate::storage) async fn store_with_a_table() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(dir.path()).await.unwrap();
        sqlx::query("CREATE TABLE scattered (key INTEGER PRIMARY KEY, round INTEGER NOT NULL, body BLOB NOT NULL)")
            .execute(writer(&db))
            .await
            .unwrap();
        (dir, db)
    }

    /// 200 rows of 600 bytes at random places: some 150 pages changed, each a
    /// frame of two writes.
    pub(in crate::storage) async fn commit_scattered_rows(pool: &sqlx::SqlitePool, round: i64) {
        let mut transaction = pool.begin().await.unwrap();
        for row in 0..200_i64 {
            let key = (row * 7_919 + round * 104_729) % 1_000_003;
            sqlx::query("INSERT OR REPLACE INTO scattered (key, round, body) VALUES (?, ?, ?)")
                .bind(key)
                .bind(round)
                .bind(vec![u8::try_from(round % 251).unwrap(); 600])
                .execute(&mut *transaction)
                .await
                .unwrap();
        }
        transaction.commit().await.unwrap();
    }

    #[tokio::test]
    async fn a_commit_of_many_pages_reaches_the_wal_in_a_few_writes() {
        let (_dir, db) = store_with_a_table().await;
        let pool = writer(&db);
        commit_scattered_rows(pool, 0).await;
        let (asked_before, issued_before) = wal_write_counts();
        for round in 1..=5 {
            commit_scattered_rows(pool, round).await;
        }
        let (asked, issued) = wal_write_counts();
        let (asked, issued) = (asked - asked_before, issued - issued_before);
        // Each commit asks for hundreds of writes (two per frame of 1 KiB) and
        // issues one per 64 KiB.
        assert!(asked >= 5 * 200, "SQLite asked for {asked} WAL writes in five commits");
        assert!(issued * 16 <= asked, "{issued} WAL writes issued for {asked} asked, in five commits");
        // The buffer is sound only where every commit syncs the WAL.
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(pool).await.unwrap();
        assert_eq!(synchronous, 2, "synchronous=FULL");
        db.close().await;
    }

    /// What went through the buffer is what SQLite wrote: another connection,
    /// on the platform's own VFS, reads every commit from the WAL the buffered
    /// writer wrote, before and after checkpoints restart it, and so does a
    /// fresh open of the file after the writer is gone.
    #[tokio::test]
    async fn a_connection_without_the_vfs_reads_what_went_through_it() {
        let (dir, db) = store_with_a_table().await;
        let pool = writer(&db);
        let plain = SqliteConnectOptions::new()
            .filename(dir.path().join("gavel.db"))
            .journal_mode(SqliteJournalMode::Wal)
            .read_only(true);
        let mut reader = plain.connect().await.unwrap();
        let summary = "SELECT count(*), sum(key * round), sum(length(body)) FROM scattered";
        for round in 0..30_i64 {
            commit_scattered_rows(pool, round).await;
            if round % 10 == 9 {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(pool).await.unwrap();
            }
            let seen: (i64, i64, i64) = sqlx::query_as(summary).fetch_one(&mut reader).await.unwrap();
            let written: (i64, i64, i64) = sqlx::query_as(summary).fetch_one(pool).await.unwrap();
            assert_eq!(seen, written, "round {round}");
            let bodies: Vec<Vec<u8>> = sqlx::query_scalar("SELECT body FROM scattered WHERE round = ?")
                .bind(round)
                .fetch_all(&mut reader)
                .await
                .unwrap();
            assert_eq!(bodies.len(), 200, "round {round}");
            assert!(bodies.iter().all(|body| *body == vec![u8::try_from(round % 251).unwrap(); 600]), "round {round}");
        }
        let checksum = "SELECT sum(key * round) + sum(length(body)) FROM scattered";
        let before: i64 = sqlx::query_scalar(checksum).fetch_one(&mut reader).await.unwrap();
        reader.close().await.unwrap();
        db.close().await;
        let mut reopened = SqliteConnectOptions::new().filename(dir.path().join("gavel.db")).connect().await.unwrap();
        let after: i64 = sqlx::query_scalar(checksum).fetch_one(&mut reopened).await.unwrap();
        assert_eq!(after, before);
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut reopened).await.unwrap();
        assert_eq!(integrity, "ok");
    }

    /// The two sync calls, counted for this test binary: these definitions
    /// take the C library's place for everything linked into it, the bundled
    /// SQLite included, and make the same system calls.
    static FSYNCS: AtomicU64 = AtomicU64::new(0);
    static FDATASYNCS: AtomicU64 = AtomicU64::new(0);

    #[unsafe(no_mangle)]
    extern "C" fn fsync(fd: c_int) -> c_int {
        FSYNCS.fetch_add(1, Relaxed);
        // SAFETY: the system call fsync(2) itself, with the caller's descriptor.
        unsafe { libc::syscall(libc::SYS_fsync, fd) as c_int }
    }

    #[unsafe(no_mangle)]
    extern "C" fn fdatasync(fd: c_int) -> c_int {
        FDATASYNCS.fetch_add(1, Relaxed);
        // SAFETY: the system call fdatasync(2) itself, with the caller's descriptor.
        unsafe { libc::syscall(libc::SYS_fdatasync, fd) as c_int }
    }

    /// SQLite syncs with fdatasync(2), which leaves out the file's times
    /// (the bundled build calls fsync(2) unless `HAVE_FDATASYNC` is set, in
    /// `.cargo/config.toml`): every commit syncs the WAL, and none calls fsync.
    #[tokio::test]
    async fn a_commit_syncs_the_wal_with_fdatasync() {
        let (_dir, db) = store_with_a_table().await;
        let pool = writer(&db);
        commit_scattered_rows(pool, 0).await;
        let (fsyncs_before, fdatasyncs_before) = (FSYNCS.load(Relaxed), FDATASYNCS.load(Relaxed));
        for round in 1..=5 {
            commit_scattered_rows(pool, round).await;
        }
        let (fsyncs, fdatasyncs) = (FSYNCS.load(Relaxed) - fsyncs_before, FDATASYNCS.load(Relaxed) - fdatasyncs_before);
        assert_eq!(fsyncs, 0, "fsync(2) called {fsyncs} times in five commits");
        assert!(fdatasyncs >= 5, "fdatasync(2) called {fdatasyncs} times in five commits");
        db.close().await;
    }
}
