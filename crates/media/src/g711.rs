//! ITU-T G.711 companding: µ-law (PCMU, RTP payload type 0) and A-law (PCMA,
//! payload type 8), as 8-bit codes to 16-bit linear PCM and between each
//! other. The µ<->A tables are built at compile time through the linear value
//! (the classic Sun `g711.c` algorithm), so converting a frame is one table
//! look-up per byte, in place.

/// Silence in µ-law (linear 0).
pub const ULAW_SILENCE: u8 = 0xFF;
/// Silence in A-law (linear +8, the code closest to 0).
pub const ALAW_SILENCE: u8 = 0xD5;

const BIAS: i32 = 0x84;

/// µ-law code to linear PCM.
pub const fn ulaw_to_linear(u: u8) -> i16 {
    let u = !u;
    let exp = ((u >> 4) & 0x07) as i32;
    let mant = (u & 0x0f) as i32;
    let t = (((mant << 3) + BIAS) << exp) - BIAS;
    if u & 0x80 != 0 {
        -t as i16
    } else {
        t as i16
    }
}

/// A-law code to linear PCM.
pub const fn alaw_to_linear(a: u8) -> i16 {
    let a = a ^ 0x55;
    let exp = ((a >> 4) & 0x07) as i32;
    let mut t = ((a & 0x0f) as i32) << 4;
    if exp == 0 {
        t += 8;
    } else {
        t = (t + 0x108) << (exp - 1);
    }
    if a & 0x80 != 0 {
        t as i16
    } else {
        -t as i16
    }
}

/// The segment of a magnitude: the first `end` it does not exceed, 8 if none.
const fn segment(v: i32, ends: &[i32; 8]) -> i32 {
    let mut i = 0;
    while i < 8 {
        if v <= ends[i] {
            return i as i32;
        }
        i += 1;
    }
    8
}

/// Linear PCM to µ-law.
pub const fn linear_to_ulaw(pcm: i16) -> u8 {
    const ENDS: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];
    let mut v = (pcm as i32) >> 2;
    let mask: i32 = if v < 0 {
        v = -v;
        0x7F
    } else {
        0xFF
    };
    if v > 8159 {
        v = 8159;
    }
    v += BIAS >> 2;
    let seg = segment(v, &ENDS);
    if seg >= 8 {
        return (0x7F ^ mask) as u8;
    }
    (((seg << 4) | ((v >> (seg + 1)) & 0x0F)) ^ mask) as u8
}

/// Linear PCM to A-law.
pub const fn linear_to_alaw(pcm: i16) -> u8 {
    const ENDS: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];
    let mut v = (pcm as i32) >> 3;
    let mask: i32 = if v >= 0 {
        0xD5
    } else {
        v = -v - 1;
        0x55
    };
    let seg = segment(v, &ENDS);
    if seg >= 8 {
        return (0x7F ^ mask) as u8;
    }
    let q = if seg < 2 {
        (v >> 1) & 0x0F
    } else {
        (v >> seg) & 0x0F
    };
    (((seg << 4) | q) ^ mask) as u8
}

const fn table(ulaw_to_alaw: bool) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if ulaw_to_alaw {
            linear_to_alaw(ulaw_to_linear(i as u8))
        } else {
            linear_to_ulaw(alaw_to_linear(i as u8))
        };
        i += 1;
    }
    t
}

/// µ-law code -> A-law code.
pub static ULAW_TO_ALAW: [u8; 256] = table(true);
/// A-law code -> µ-law code.
pub static ALAW_TO_ULAW: [u8; 256] = table(false);

/// Converts a µ-law payload to A-law, in place.
pub fn ulaw_to_alaw_in_place(buf: &mut [u8]) {
    for b in buf {
        *b = ULAW_TO_ALAW[usize::from(*b)];
    }
}

/// Converts an A-law payload to µ-law, in place.
pub fn alaw_to_ulaw_in_place(buf: &mut [u8]) {
    for b in buf {
        *b = ALAW_TO_ULAW[usize::from(*b)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_decode_to_the_standard_values() {
        // ITU-T G.711 tables: µ-law 0xFF/0x7F are +0/-0, 0x80 is the largest
        // positive value (32124), 0x00 the largest negative.
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(ulaw_to_linear(0x7F), 0);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        // A-law 0xD5 is +8, 0x55 is -8, 0xAA the largest positive (32256).
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        assert_eq!(alaw_to_linear(0xAA), 32256);
        assert_eq!(alaw_to_linear(0x2A), -32256);
    }

    #[test]
    fn every_code_survives_decode_then_encode() {
        for c in 0..=255u8 {
            assert_eq!(linear_to_alaw(alaw_to_linear(c)), c, "A-law {c:#x}");
            let u = linear_to_ulaw(ulaw_to_linear(c));
            // µ-law has two zeros (0xFF, 0x7F): -0 encodes as +0.
            if c == 0x7F {
                assert_eq!(u, 0xFF);
            } else {
                assert_eq!(u, c, "µ-law {c:#x}");
            }
        }
    }

    #[test]
    fn conversion_keeps_the_value_within_one_quantization_step() {
        for c in 0..=255u8 {
            let lin = i32::from(ulaw_to_linear(c));
            let via = i32::from(alaw_to_linear(ULAW_TO_ALAW[usize::from(c)]));
            // The coarser of the two codes' steps at this magnitude.
            let step = (lin.abs() / 16).max(16);
            assert!((lin - via).abs() <= step, "µ {c:#x}: {lin} vs {via}");
            let lin = i32::from(alaw_to_linear(c));
            let via = i32::from(ulaw_to_linear(ALAW_TO_ULAW[usize::from(c)]));
            let step = (lin.abs() / 16).max(16);
            assert!((lin - via).abs() <= step, "A {c:#x}: {lin} vs {via}");
        }
        assert_eq!(ULAW_TO_ALAW[usize::from(ULAW_SILENCE)], ALAW_SILENCE);
        // A-law has no zero: its silence (+8) is µ-law's +8.
        assert_eq!(ulaw_to_linear(ALAW_TO_ULAW[usize::from(ALAW_SILENCE)]), 8);
        let mut f = [ULAW_SILENCE, 0x80, 0x00];
        ulaw_to_alaw_in_place(&mut f);
        alaw_to_ulaw_in_place(&mut f);
        // µ-law 0 goes to A-law +8, which comes back as µ-law +8 (0xFE).
        assert_eq!(f, [0xFE, 0x80, 0x00]);
    }
}
