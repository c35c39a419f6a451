//! Passwords (argon2id) and tokens (HS256 JWT, `sub` = user id). The secret is
//! wrapped so it never prints, and tokens are never logged.

use std::fmt;
use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who a valid token says the caller is (`Authorization: Bearer`, or a
/// WebSocket's `auth`); `http::extract` makes it an extractor.
#[derive(Clone, Debug)]
pub struct AuthUser {
    pub id: Uuid,
    pub username: String,
}

/// How long a token is valid.
const TOKEN_LIFETIME_SECS: i64 = 7 * 24 * 3600;

/// A secret that never shows up in logs or `Debug` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The cluster secret when none is given: SHA-256 of the JWT secret under a
/// label of its own, so every node with the same JWT secret agrees on it and
/// the JWT secret itself never travels between nodes.
pub fn derive_cluster_secret(jwt_secret: &Secret) -> Secret {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"gavel cluster secret\0");
    hasher.update(jwt_secret.expose().as_bytes());
    let digest = hasher.finalize();
    Secret::new(digest.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Reads the secret kept in `data_dir/jwt-secret`, creating it on first use.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<Secret> {
    let path = data_dir.join("jwt-secret");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let trimmed = existing.trim();
        if trimmed.len() >= 32 {
            return Ok(Secret(trimmed.to_owned()));
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    write_private(&path, &secret)?;
    Ok(Secret(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    name: String,
    /// The database the user lives in: a token from another one is refused.
    db: String,
    iat: i64,
    exp: i64,
}

pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    database_id: String,
    /// Tokens already verified, by their exact text: a client sends the same
    /// token with every request, and checking its signature and decoding its
    /// JSON cost more of a rejected bid's time than anything else the node
    /// does for it. At most `VERIFIED_TOKENS_KEPT`; expiry is checked on every use.
    verified: std::sync::RwLock<std::collections::HashMap<Box<str>, Verified>>,
}

/// A verified token's user and its expiry (seconds since the epoch).
struct Verified {
    user: AuthUser,
    exp: i64,
}

/// Verified tokens remembered at most; when full, they are forgotten all at
/// once (each is verified again when next sent). Some 400 bytes each.
const VERIFIED_TOKENS_KEPT: usize = 16_384;

/// Seconds a token is still taken after its `exp` (clocks differ a little).
const EXPIRY_LEEWAY_SECS: i64 = 5;

impl Auth {
    pub fn new(secret: &Secret, database_id: &str) -> Auth {
        // Only HS256: a token naming another algorithm (or `none`) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Expiry is checked against the node's clock (`verify`'s `now_secs`),
        // for a remembered token as for a new one.
        validation.validate_exp = false;
        Auth {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            database_id: database_id.to_owned(),
            verified: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    pub fn issue(&self, user_id: Uuid, username: &str, now_secs: i64) -> String {
        let claims = Claims {
            sub: user_id,
            name: username.to_owned(),
            db: self.database_id.clone(),
            iat: now_secs,
            exp: now_secs + TOKEN_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with a valid key cannot fail")
    }

    /// The user `token` names, if it is one of ours (signed with this node's
    /// secret, for this database) and not expired at `now_secs`.
    pub fn verify(&self, token: &str, now_secs: i64) -> Option<AuthUser> {
        let unexpired = |exp: i64| now_secs <= exp.saturating_add(EXPIRY_LEEWAY_SECS);
        // Read on every request (shared), written once per token.
        if let Some(known) = self.verified.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(token) {
            return unexpired(known.exp).then(|| known.user.clone());
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        if data.claims.db != self.database_id || !unexpired(data.claims.exp) {
            return None;
        }
        let user = AuthUser { id: data.claims.sub, username: data.claims.name };
        let mut remembered = self.verified.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if remembered.len() >= VERIFIED_TOKENS_KEPT {
            remembered.clear();
        }
        remembered.insert(token.into(), Verified { user: user.clone(), exp: data.claims.exp });
        Some(user)
    }

    /// How many verified tokens are remembered (for the tests).
    #[cfg(test)]
    fn remembered_count(&self) -> usize {
        self.verified.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

/// Runs password hashing (argon2id: about 19 MiB and tens of milliseconds
/// each) on threads of its own, one per core. Unbounded (on the blocking
/// pool), a burst of logins took as many threads and as much memory as it had
/// requests (100 at once took a node from 229 MB to 2.1 GB); and even bounded
/// there, each new pool thread kept its own allocator arena of it. Excess
/// requests wait their turn for `PASSWORD_QUEUE_WAIT`, then are refused (503).
pub struct PasswordHashing {
    permits: tokio::sync::Semaphore,
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    /// A hash of nothing anyone knows: a login for an unknown name is checked
    /// against it, so it takes as long as one for a known name.
    dummy_hash: String,
}

type Job = Box<dyn FnOnce() + Send>;

/// How long a login or registration waits for a hashing slot.
pub const PASSWORD_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HashingError {
    #[error("too many password checks at once")]
    Busy,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

impl PasswordHashing {
    pub fn new() -> PasswordHashing {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let receiver = std::sync::Arc::new(std::sync::Mutex::new(receiver));
        for index in 0..cores {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("gavel-password-{index}"))
                .spawn(move || {
                    loop {
                        let job = receiver.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("spawn a password hashing thread");
        }
        let dummy_hash = hash_password(&Uuid::now_v7().to_string()).expect("hashing a random string");
        PasswordHashing { permits: tokio::sync::Semaphore::new(cores), jobs: std::sync::Mutex::new(sender), dummy_hash }
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, HashingError> {
        let _permit = tokio::time::timeout(PASSWORD_QUEUE_WAIT, self.permits.acquire())
            .await
            .map_err(|_| HashingError::Busy)?
            .map_err(|_| HashingError::Busy)?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job)
            .map_err(|_| HashingError::Failed("the hashing threads are gone".to_owned()))?;
        result.await.map_err(|_| HashingError::Failed("a hashing thread failed".to_owned()))
    }

    pub async fn hash(&self, password: String) -> Result<String, HashingError> {
        self.run(move || hash_password(&password)).await?.map_err(|error| HashingError::Failed(error.to_string()))
    }

    /// Checks `password` against `hash`, or against the dummy hash when the
    /// user does not exist (always `false` then, in the same time).
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, HashingError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let matches = self.run(move || verify_password(&password, &hash)).await?;
        Ok(known && matches)
    }
}

impl Default for PasswordHashing {
    fn default() -> Self {
        Self::new()
    }
}

/// Hashes a password with argon2id and a random salt (CPU-heavy: call from a blocking task).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt)?.to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_forgeries_fail() {
        let auth = Auth::new(&Secret::new("a".repeat(64)), "db-1");
        let other = Auth::new(&Secret::new("b".repeat(64)), "db-1");
        let other_database = Auth::new(&Secret::new("a".repeat(64)), "db-2");
        let id = Uuid::now_v7();
        let now = chrono::Utc::now().timestamp();
        let token = auth.issue(id, "alice", now);
        assert_eq!(auth.verify(&token, now).map(|user| user.id), Some(id));
        assert!(other.verify(&token, now).is_none(), "signed with another secret");
        assert!(other_database.verify(&token, now).is_none(), "issued for another database");
        assert!(auth.verify(&auth.issue(id, "alice", now - 2 * TOKEN_LIFETIME_SECS), now).is_none(), "expired");
        assert!(format!("{:?}", Secret::new("hunter2".to_owned())).find("hunter2").is_none());
    }

    /// A token verified once is remembered, and still refused from the moment
    /// it expires; a token that differs from it in any way is checked afresh;
    /// the memory stays within its bound.
    #[test]
    fn remembered_tokens_expire_on_time_and_stay_bounded() {
        let auth = Auth::new(&Secret::new("a".repeat(64)), "db-1");
        let id = Uuid::now_v7();
        let issued_at = 1_800_000_000;
        let token = auth.issue(id, "alice", issued_at);
        assert_eq!(auth.verify(&token, issued_at).map(|user| user.id), Some(id));
        assert_eq!(auth.remembered_count(), 1);
        let last_second = issued_at + TOKEN_LIFETIME_SECS + EXPIRY_LEEWAY_SECS;
        let remembered = auth.verify(&token, last_second).expect("valid until its expiry and the leeway");
        assert_eq!((remembered.id, remembered.username.as_str()), (id, "alice"));
        assert!(auth.verify(&token, last_second + 1).is_none(), "expired, though remembered");
        assert_eq!(auth.remembered_count(), 1, "the refusal above came from the remembered token");

        // The same token with its signature altered, or another database's.
        let mut forged = token.clone();
        let last = forged.pop().expect("a token has text");
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(auth.verify(&forged, issued_at).is_none(), "a forged signature");
        let elsewhere = Auth::new(&Secret::new("a".repeat(64)), "db-2").issue(id, "alice", issued_at);
        assert!(auth.verify(&elsewhere, issued_at).is_none(), "another database's token");
        assert_eq!(auth.remembered_count(), 1, "refused tokens are not remembered");

        for user in 0..VERIFIED_TOKENS_KEPT {
            let token = auth.issue(Uuid::from_u128(user as u128), "bob", issued_at);
            assert!(auth.verify(&token, issued_at).is_some());
            assert!(auth.remembered_count() <= VERIFIED_TOKENS_KEPT);
        }
        assert!(auth.remembered_count() < VERIFIED_TOKENS_KEPT, "forgotten all at once when full, then filled again");
        assert_eq!(auth.verify(&token, issued_at).map(|user| user.id), Some(id), "verified again once forgotten");
    }

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
    }
}
