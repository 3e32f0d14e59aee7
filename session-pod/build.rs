//! Link the `wa-session` binary with packed relative relocations (DT_RELR).
//!
//! A position-independent executable carries one relocation per pointer stored in its
//! read-only data (vtables, string tables): ~31,000 of them, a 0.7 MiB `.rela.dyn` that the
//! loader reads at every start and that stays resident. DT_RELR encodes the same relocations
//! in a few KiB, so the pod keeps ASLR and drops those pages (BENCHMARKS.md, "Session pod").
//! It needs glibc 2.36 at run time (the distroless cc-debian12 image has it; an older glibc
//! refuses to start the binary with a clear "GLIBC_ABI_DT_RELR not found"), and a linker that
//! knows the flag: rust-lld, the default on x86_64 Linux since Rust 1.90, and GNU ld >= 2.38.
//! `WA_SESSION_RELR=0` at build time links without it (an older glibc target, or to measure).
//! `WA_SESSION_PIE=0` links a position-dependent executable: for measuring only, it gives up
//! ASLR for the binary (BENCHMARKS.md has the figures and the argument).
//!
//! Release builds also hand the linker `wa-session.order`, the functions a session runs
//! (recorded by bench/session-pod/order.sh), so they sit together at the start of `.text`: the
//! kernel maps code in 64 KiB windows around each page executed, and with the functions a
//! session runs spread over the whole binary those windows held mostly code it never runs.
//! Names the binary no longer has are skipped. `WA_SESSION_ORDER=0` links without the list,
//! `WA_SESSION_ORDER=<file>` with another one (to measure).

fn main() {
    println!("cargo:rerun-if-env-changed=WA_SESSION_RELR");
    println!("cargo:rerun-if-env-changed=WA_SESSION_PIE");
    if std::env::var("WA_SESSION_PIE").is_ok_and(|v| v == "0") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // rust-lld is the default linker there; elsewhere the binary is linked as it was.
    let rust_lld = os == "linux" && env == "gnu" && arch == "x86_64";
    if rust_lld && !std::env::var("WA_SESSION_RELR").is_ok_and(|v| v == "0") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if rust_lld {
        link_in_order();
    }
}

/// rust-lld's `--symbol-ordering-file`; release builds only (the names are those of release code).
fn link_in_order() {
    println!("cargo:rerun-if-env-changed=WA_SESSION_ORDER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let order = match std::env::var("WA_SESSION_ORDER") {
        Ok(v) if v == "0" => return,
        Ok(path) if !path.is_empty() => std::path::PathBuf::from(path),
        _ => match std::env::var("CARGO_MANIFEST_DIR") {
            Ok(dir) => std::path::Path::new(&dir).join("wa-session.order"),
            Err(_) => return,
        },
    };
    println!("cargo:rerun-if-changed={}", order.display());
    if release && order.exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", order.display());
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
