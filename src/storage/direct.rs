//! SQLite's group commit run by the calling thread, with SQLite's C API, on
//! the writer connection.
//!
//! Through sqlx every statement text is a message to the connection's own
//! thread and an answer back, each waking a thread; the commit was one such
//! trip (`sqlite_commit_sql`), and its answer then waited for the node's busy
//! worker before the persistence actor could send the next batch. The
//! persistence actor now runs on a thread of its own on SQLite as on
//! Postgres (`PersistenceSettings::own_thread`), and runs each commit's
//! statements itself: the commit's answer is in hand when it returns, and the
//! next batch goes at once (README, "The path of a bid").
//!
//! Sharing the connection with sqlx: the raw handle is taken once from
//! sqlx (`LockedSqliteHandle`). sqlx's thread for the connection touches it
//! only to run a command sent to it, and the writer's commands are sent by
//! whoever holds the writer's turn (`kept::WriterGuard`), one at a time. So a
//! `Direct` exists only between sqlx commands: the guard drops it (finalizing
//! its statements) before it lends the connection to sqlx, and a turn
//! dropped in the middle of a sqlx command has none to drop. SQLite refuses
//! to close a connection with statements left (and sqlx panics on that),
//! which is the other reason they are finalized first.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::ptr::NonNull;
use std::time::Instant;

use libsqlite3_sys as ffi;

/// One bound value of a commit's statements, in order across them.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum SqlValue {
    Null,
    Int(i64),
    Text(String),
    /// A UUID, stored as its 16 bytes (as sqlx stores one).
    Uuid([u8; 16]),
}

/// What SQLite said when a commit failed: its extended result code and
/// message, and whether the connection is still inside the commit's
/// transaction (its rollback failed too; the connection should be closed).
#[derive(Debug)]
pub(super) struct SqliteFailure {
    pub code: c_int,
    pub message: String,
    pub in_transaction: bool,
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error returned from SQLite: (code: {}) {}", self.code, self.message)
    }
}

/// The most commit shapes kept prepared (as sqlx's statement cache bounds it).
const SHAPES_KEPT: usize = 256;

/// How often (in SQLite's virtual machine instructions) a running commit
/// looks at its deadline.
const DEADLINE_CHECK_EVERY: c_int = 10_000;

/// A raw connection handle, with the commits' statements prepared on it.
pub(super) struct Direct {
    db: NonNull<ffi::sqlite3>,
    /// The statements of each commit shape (`execute`'s `shape`).
    statements: HashMap<Vec<usize>, Vec<NonNull<ffi::sqlite3_stmt>>>,
    /// The running commit's deadline, read by the progress handler (boxed:
    /// SQLite holds its address).
    deadline: Box<Cell<Option<Instant>>>,
}

// SAFETY: the handle and statements are used by one thread at a time, the
// holder of the writer's turn (see the module's documentation).
unsafe impl Send for Direct {}

/// SQLite's progress handler: non-zero interrupts the running statement.
extern "C" fn past_deadline(deadline: *mut c_void) -> c_int {
    // SAFETY: the `Cell` of a live `Direct`, which removes the handler before it goes.
    let deadline = unsafe { &*deadline.cast::<Cell<Option<Instant>>>() };
    c_int::from(deadline.get().is_some_and(|deadline| Instant::now() >= deadline))
}

impl Direct {
    /// # Safety
    /// `db` is an open connection that nothing else uses while this `Direct`
    /// exists, and that stays open until it is dropped.
    pub(super) unsafe fn new(db: NonNull<ffi::sqlite3>) -> Direct {
        let deadline = Box::new(Cell::new(None));
        let argument = std::ptr::from_ref::<Cell<Option<Instant>>>(&deadline).cast_mut().cast::<c_void>();
        // SAFETY: `db` is open (the caller's promise); the argument lives as long as the handler.
        unsafe { ffi::sqlite3_progress_handler(db.as_ptr(), DEADLINE_CHECK_EVERY, Some(past_deadline), argument) };
        Direct { db, statements: HashMap::new(), deadline }
    }

    /// Runs the statements of `text` in order with `values` bound in order
    /// across them (`?` parameters), stopping at the first that fails; then
    /// rolls back what it began. `shape` names the text (it is built only the
    /// first time a shape is seen). A statement still running at `deadline` is
    /// interrupted.
    pub(super) fn execute(
        &mut self,
        shape: &[usize],
        text: impl FnOnce() -> String,
        values: &[SqlValue],
        deadline: Instant,
    ) -> Result<(), SqliteFailure> {
        if !self.statements.contains_key(shape) {
            if self.statements.len() >= SHAPES_KEPT {
                self.finalize_all();
            }
            let statements = self.prepare(&text())?;
            self.statements.insert(shape.to_vec(), statements);
        }
        self.deadline.set(Some(deadline));
        let outcome = self.run(shape, values);
        self.deadline.set(None);
        outcome
    }

    /// Runs the shape's statements, rolling back what they began if one fails.
    fn run(&self, shape: &[usize], values: &[SqlValue]) -> Result<(), SqliteFailure> {
        self.run_statements(shape, values).map_err(|mut failure| {
            failure.in_transaction = !self.roll_back();
            failure
        })
    }

    fn run_statements(&self, shape: &[usize], values: &[SqlValue]) -> Result<(), SqliteFailure> {
        let mut values = values.iter();
        for statement in &self.statements[shape] {
            let statement = statement.as_ptr();
            self.bind_all(statement, &mut values)?;
            // SAFETY: a statement of this connection, prepared by `prepare`.
            let stepped = unsafe {
                let mut code = ffi::sqlite3_step(statement);
                while code == ffi::SQLITE_ROW {
                    code = ffi::sqlite3_step(statement);
                }
                code
            };
            let failed = (stepped != ffi::SQLITE_DONE).then(|| self.failure());
            // SAFETY: as above; text and blobs were bound as copies.
            unsafe { ffi::sqlite3_reset(statement) };
            if let Some(failure) = failed {
                return Err(failure);
            }
        }
        debug_assert!(values.next().is_none(), "a commit bound more values than it has parameters");
        Ok(())
    }

    fn bind_all<'a>(
        &self,
        statement: *mut ffi::sqlite3_stmt,
        values: &mut impl Iterator<Item = &'a SqlValue>,
    ) -> Result<(), SqliteFailure> {
        // SAFETY: a statement of this connection.
        let count = unsafe { ffi::sqlite3_bind_parameter_count(statement) };
        for index in 1..=count {
            let Some(value) = values.next() else {
                return Err(SqliteFailure {
                    code: ffi::SQLITE_RANGE,
                    message: "the commit has fewer values than parameters".to_owned(),
                    in_transaction: false,
                });
            };
            // SAFETY: as above; SQLite copies text and blobs (`SQLITE_TRANSIENT`).
            let code = unsafe {
                match value {
                    SqlValue::Null => ffi::sqlite3_bind_null(statement, index),
                    SqlValue::Int(value) => ffi::sqlite3_bind_int64(statement, index, *value),
                    SqlValue::Text(text) => ffi::sqlite3_bind_text(
                        statement,
                        index,
                        text.as_ptr().cast(),
                        text.len() as c_int,
                        ffi::SQLITE_TRANSIENT(),
                    ),
                    SqlValue::Uuid(bytes) => ffi::sqlite3_bind_blob(
                        statement,
                        index,
                        bytes.as_ptr().cast(),
                        bytes.len() as c_int,
                        ffi::SQLITE_TRANSIENT(),
                    ),
                }
            };
            if code != ffi::SQLITE_OK {
                return Err(self.failure());
            }
        }
        Ok(())
    }

    /// Ends the transaction a failed commit began, if SQLite has not already.
    /// Returns whether the connection is out of any transaction.
    fn roll_back(&self) -> bool {
        // SAFETY: the open connection; a plain statement without callbacks.
        unsafe {
            if ffi::sqlite3_get_autocommit(self.db.as_ptr()) == 0 {
                let rollback = c"ROLLBACK";
                ffi::sqlite3_exec(
                    self.db.as_ptr(),
                    rollback.as_ptr(),
                    None,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                );
            }
            ffi::sqlite3_get_autocommit(self.db.as_ptr()) != 0
        }
    }

    fn failure(&self) -> SqliteFailure {
        // SAFETY: the open connection; its message is copied before the next call on it.
        unsafe {
            let message = CStr::from_ptr(ffi::sqlite3_errmsg(self.db.as_ptr())).to_string_lossy().into_owned();
            SqliteFailure { code: ffi::sqlite3_extended_errcode(self.db.as_ptr()), message, in_transaction: false }
        }
    }

    /// The statements of `text`, in order.
    fn prepare(&self, text: &str) -> Result<Vec<NonNull<ffi::sqlite3_stmt>>, SqliteFailure> {
        let mut statements = Vec::new();
        let mut rest = text.as_bytes();
        while !rest.is_empty() {
            let mut statement = std::ptr::null_mut();
            let mut tail = std::ptr::null();
            // SAFETY: the pointer and length are `rest`'s; SQLite sets `tail` inside it.
            let code = unsafe {
                ffi::sqlite3_prepare_v3(
                    self.db.as_ptr(),
                    rest.as_ptr().cast(),
                    rest.len() as c_int,
                    ffi::SQLITE_PREPARE_PERSISTENT as _,
                    &mut statement,
                    &mut tail,
                )
            };
            if code != ffi::SQLITE_OK {
                let failure = self.failure();
                finalize(statements);
                return Err(failure);
            }
            rest = &rest[tail as usize - rest.as_ptr() as usize..];
            match NonNull::new(statement) {
                Some(statement) => statements.push(statement),
                // Only white space or a comment was left.
                None => break,
            }
        }
        Ok(statements)
    }

    fn finalize_all(&mut self) {
        for (_, statements) in self.statements.drain() {
            finalize(statements);
        }
    }
}

fn finalize(statements: Vec<NonNull<ffi::sqlite3_stmt>>) {
    for statement in statements {
        // SAFETY: a statement of an open connection, not used after this.
        unsafe { ffi::sqlite3_finalize(statement.as_ptr()) };
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        self.finalize_all();
        // SAFETY: the connection is still open (`new`'s contract).
        unsafe { ffi::sqlite3_progress_handler(self.db.as_ptr(), 0, None, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::Connection as _;
    use sqlx::sqlite::SqliteConnection;

    use super::*;

    const TWO_ROWS: &str = "BEGIN; INSERT INTO t (id, amount) VALUES (?, ?); \
                            INSERT INTO t (id, amount) VALUES (?, ?); COMMIT;";

    async fn table() -> SqliteConnection {
        let mut connection = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (id BLOB PRIMARY KEY, amount INTEGER CONSTRAINT positive CHECK (amount > 0))")
            .execute(&mut connection)
            .await
            .unwrap();
        connection
    }

    fn row(id: u8, amount: i64) -> [SqlValue; 2] {
        [SqlValue::Uuid([id; 16]), SqlValue::Int(amount)]
    }

    /// The statements of a text run in order, the values bound in order
    /// across them; a shape's text is prepared once; a statement that fails
    /// stops the rest and rolls back those before it, and names what failed.
    #[tokio::test]
    async fn statements_run_in_order_and_a_failure_rolls_back_the_ones_before_it() {
        let mut connection = table().await;
        let mut handle = connection.lock_handle().await.unwrap();
        // SAFETY: the handle stays locked (sqlx's thread does not use it) while `direct` lives.
        let mut direct = unsafe { Direct::new(handle.as_raw_handle()) };
        let texts_built = Cell::new(0);
        let text = || {
            texts_built.set(texts_built.get() + 1);
            TWO_ROWS.to_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let values: Vec<SqlValue> = [row(1, 100), row(2, 200)].concat();
        direct.execute(&[2], text, &values, deadline).unwrap();
        let values: Vec<SqlValue> = [row(3, 300), row(4, 0)].concat();
        let failure = direct.execute(&[2], text, &values, deadline).unwrap_err();
        assert_eq!(failure.code & 0xff, ffi::SQLITE_CONSTRAINT, "{failure}");
        assert!(failure.message.contains("positive"), "{failure}");
        assert!(!failure.in_transaction, "rolled back");
        let values: Vec<SqlValue> = [row(5, 500), row(6, 600)].concat();
        direct.execute(&[2], text, &values, deadline).expect("the next commit runs");
        assert_eq!(texts_built.get(), 1, "one shape, prepared once");
        drop(direct);
        drop(handle);
        let amounts: Vec<i64> =
            sqlx::query_scalar("SELECT amount FROM t ORDER BY amount").fetch_all(&mut connection).await.unwrap();
        assert_eq!(amounts, vec![100, 200, 500, 600], "nothing of the failed commit");
        connection.close().await.expect("no statement left open on the connection");
    }

    /// A commit still running at its deadline is interrupted and rolled back,
    /// and the connection goes on.
    #[tokio::test]
    async fn a_commit_running_past_its_deadline_is_interrupted() {
        let mut connection = table().await;
        let mut handle = connection.lock_handle().await.unwrap();
        // SAFETY: as above.
        let mut direct = unsafe { Direct::new(handle.as_raw_handle()) };
        let endless = || {
            "BEGIN; INSERT INTO t (id, amount) VALUES (?, 1); \
             WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n; COMMIT;"
                .to_owned()
        };
        let started = Instant::now();
        let failure =
            direct.execute(&[1], endless, &[SqlValue::Uuid([9; 16])], started + Duration::from_millis(50)).unwrap_err();
        assert_eq!(failure.code, ffi::SQLITE_INTERRUPT, "{failure}");
        assert!(!failure.in_transaction);
        assert!(started.elapsed() < Duration::from_secs(5), "stopped at its deadline: {:?}", started.elapsed());
        let values: Vec<SqlValue> = [row(1, 100), row(2, 200)].concat();
        let deadline = Instant::now() + Duration::from_secs(10);
        direct.execute(&[2], || TWO_ROWS.to_owned(), &values, deadline).expect("the next commit runs");
        drop(direct);
        drop(handle);
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&mut connection).await.unwrap();
        assert_eq!(count, 2, "nothing of the interrupted commit");
    }
}
