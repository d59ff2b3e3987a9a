//! Shared by the repository index targets: bytes with their trailing CRC-32 recomputed.

/// `data` with its last 4 bytes replaced by the CRC-32 of the rest, so that mutations reach
/// the parser behind the checksum instead of stopping at it.
pub fn with_crc(data: &[u8]) -> Vec<u8> {
    let mut fixed = data.to_vec();
    if fixed.len() >= 4 {
        let body = fixed.len() - 4;
        let crc = crc32fast::hash(&fixed[..body]);
        fixed[body..].copy_from_slice(&crc.to_le_bytes());
    }
    fixed
}
