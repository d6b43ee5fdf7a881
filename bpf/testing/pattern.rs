//! Payload pattern shared by the test client (`testing/client.rs`) and the integration tests.

/// Byte `offset` of the stream of connection `conn`: a multiplicative hash of the position, so
/// that any reordering, loss or duplication of a chunk shows up as a mismatch.
pub fn pattern(seed: u64, conn: u64, offset: u64) -> u8 {
    let x = (offset ^ (conn << 40) ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}
