//! Kafka's record batch header (message format v2, KIP-98) and its CRC-32C: where `produce` writes
//! the fields and `fetch` reads them.

// The batch header (KIP-98): base offset i64, length i32, partition leader epoch i32, magic i8,
// CRC u32, attributes i16, last offset delta i32, first and max timestamps i64, producer id i64,
// producer epoch i16, base sequence i32, record count i32.
pub const HEADER_BYTES: usize = 61;
pub const LENGTH_AT: usize = 8;
pub const MAGIC_AT: usize = 16;
pub const CRC_AT: usize = 17;
pub const ATTRIBUTES_AT: usize = 21; // the CRC covers the batch from here to its end
pub const LAST_OFFSET_DELTA_AT: usize = 23;
pub const FIRST_TIMESTAMP_AT: usize = 27;
pub const MAX_TIMESTAMP_AT: usize = 35;
pub const PRODUCER_ID_AT: usize = 43;
pub const PRODUCER_EPOCH_AT: usize = 51;
pub const BASE_SEQUENCE_AT: usize = 53;
pub const COUNT_AT: usize = 57;
pub const MAGIC: u8 = 2;
pub const NO_PARTITION_LEADER_EPOCH: i32 = -1;
// The attributes' bits (`produce` writes none of them).
pub const COMPRESSION_MASK: i16 = 0x07;
pub const LOG_APPEND_TIME: i16 = 0x08;
pub const TRANSACTIONAL: i16 = 0x10;
pub const CONTROL: i16 = 0x20;

const CASTAGNOLI: u32 = 0x82F6_3B78; // CRC-32C's polynomial, reflected

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut crc = n as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ CASTAGNOLI } else { crc >> 1 };
            bit += 1;
        }
        table[n] = crc;
        n += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32C, as Kafka's record batches carry it: by the processor's instruction where it has one.
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("sse4.2") {
            // SAFETY: the instruction set was detected just now.
            return unsafe { crc32c_sse42(data) };
        }
    }
    crc32c_by_table(data)
}

fn crc32c_by_table(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC_TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc = !0u64;
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes([word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7]]));
    }
    let mut crc = crc as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_its_check_value_both_ways() {
        // The standard check value of CRC-32C: the CRC of the ASCII digits 1 to 9.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_by_table(b"123456789"), 0xE306_9283);
        let long: Vec<u8> = (0..1_000u32).map(|n| (n * 7 + 3) as u8).collect();
        assert_eq!(crc32c(&long), crc32c_by_table(&long));
    }
}
