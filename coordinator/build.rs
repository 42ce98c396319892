//! Rebuilds the coordinator when a migration is added or changed: they are
//! embedded by `sqlx::migrate!`, which cargo does not track on its own.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
