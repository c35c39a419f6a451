//! `sqlx::migrate!` embeds migrations/ at compile time; stable Rust cannot
//! tell cargo about the files it read, so this does: adding or changing a
//! migration rebuilds the binary.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
