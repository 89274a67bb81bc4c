//! CRC-16/CCITT-FALSE (also "CRC-16/IBM-3740"): polynomial 0x1021, initial value 0xFFFF, no
//! reflection, no final XOR; check value 0x29B1 for "123456789".
//!
//! Chosen over CRC-16/MODBUS because it is the one most microcontroller SDKs and HALs ship
//! (e.g. as "CRC-CCITT"), so device firmware rarely needs its own implementation.

const TABLE: [u16; 256] = table();

const fn table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// CRC-16/CCITT-FALSE of `data`.
pub(super) fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0xFFFF, |crc, &b| {
        (crc << 8) ^ TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_catalogue_check_value() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
    }

    #[test]
    fn empty_input_is_the_initial_value() {
        assert_eq!(crc16(b""), 0xFFFF);
    }

    #[test]
    fn table_agrees_with_the_bitwise_definition() {
        fn bitwise(data: &[u8]) -> u16 {
            let mut crc = 0xFFFFu16;
            for &b in data {
                crc ^= u16::from(b) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ 0x1021
                    } else {
                        crc << 1
                    };
                }
            }
            crc
        }
        let data: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
        for end in 0..data.len() {
            assert_eq!(crc16(&data[..end]), bitwise(&data[..end]));
        }
    }
}
