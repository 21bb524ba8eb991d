//! `sqlx::migrate!` embeds `migrations/` at compile time; Cargo does not know that, so a new
//! migration file would otherwise not rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
