//! Randomness from the operating system.

/// Fills `buf` from the OS CSPRNG. Failing to read the kernel's random source
/// is a broken machine, not a recoverable condition: we abort rather than
/// issue predictable serials or tokens.
pub fn fill(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        eprintln!("fatal: the OS random number generator failed: {e}");
        std::process::abort();
    }
}

/// `n` random bytes as lower-case hex.
pub fn hex_token(n: usize) -> String {
    let mut buf = vec![0u8; n];
    fill(&mut buf);
    edgepool_common::identity::hex(&buf)
}

/// A random 64-bit number (request ids, nonces).
pub fn u64() -> u64 {
    let mut buf = [0u8; 8];
    fill(&mut buf);
    u64::from_le_bytes(buf)
}
