//! GGML block encodings: f16, Q8_0 and Q4_0, bit for bit as ggml's reference
//! quantizers (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) compute them.
//!
//! Both quantized formats cut a row into blocks of 32 values (rows must be a multiple
//! of 32 long) and store one f16 scale `d` per block:
//!
//! ```text
//! Q8_0 (34 bytes): d = max|x| / 127           q = round(x / d) as i8     x ≈ q·d
//! Q4_0 (18 bytes): d = m / -8, m the value     q = min(15, trunc(x/d + 8.5))
//!                  of largest magnitude        x ≈ (q − 8)·d
//!                  bytes: d, then 16 bytes, byte j = q[j] | q[j+16] << 4
//! ```
//!
//! Largest error per value: Q8_0 about `d/2`, Q4_0 `|d|` (the value `+|m|` lands on
//! `7·|d|`, one step short), plus the f16 rounding of `d`.

use half::f16;
use rayon::prelude::*;

/// Values per quantized block.
pub const QK: usize = 32;
/// Bytes of a Q8_0 block.
pub const Q8_0_BLOCK: usize = 2 + QK;
/// Bytes of a Q4_0 block.
pub const Q4_0_BLOCK: usize = 2 + QK / 2;

/// Little-endian f32 bytes.
pub fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian f16 bytes (round to nearest even).
pub fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.par_iter()
        .flat_map_iter(|v| f16::from_f32(*v).to_le_bytes())
        .collect()
}

fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

fn q4_0_block(x: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..QK / 2 {
        out[2 + j] = q(x[j]) | (q(x[j + QK / 2]) << 4);
    }
}

fn blocks(x: &[f32], block_bytes: usize, f: fn(&[f32], &mut [u8])) -> Vec<u8> {
    assert_eq!(
        x.len() % QK,
        0,
        "quantized rows are a multiple of {QK} long"
    );
    let mut out = vec![0u8; x.len() / QK * block_bytes];
    out.par_chunks_mut(block_bytes)
        .zip(x.par_chunks(QK))
        .for_each(|(o, b)| f(b, o));
    out
}

/// Q8_0 blocks of `x` (length a multiple of 32).
pub fn q8_0(x: &[f32]) -> Vec<u8> {
    blocks(x, Q8_0_BLOCK, q8_0_block)
}

/// Q4_0 blocks of `x` (length a multiple of 32).
pub fn q4_0(x: &[f32]) -> Vec<u8> {
    blocks(x, Q4_0_BLOCK, q4_0_block)
}

/// Values of Q8_0 blocks.
pub fn dequantize_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks(Q8_0_BLOCK)
        .flat_map(|b| {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            b[2..].iter().map(move |&q| q as i8 as f32 * d)
        })
        .collect()
}

/// Values of Q4_0 blocks.
pub fn dequantize_q4_0(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / Q4_0_BLOCK * QK);
    for b in bytes.chunks(Q4_0_BLOCK) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let qs = &b[2..];
        out.extend(qs.iter().map(|q| ((q & 0x0f) as f32 - 8.0) * d));
        out.extend(qs.iter().map(|q| ((q >> 4) as f32 - 8.0) * d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let y = dequantize_q8_0(&q8_0(&x));
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let d = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= d * 0.57, "block {b}: {a} vs {c}");
            }
        }
    }

    #[test]
    fn q4_0_keeps_the_largest_value_exactly_and_zero_blocks_are_zero() {
        let mut x = vec![0f32; 64];
        x[3] = -2.0;
        x[40] = 1.5;
        x[50] = -0.4;
        let y = dequantize_q4_0(&q4_0(&x));
        assert_eq!(y[3], -2.0);
        assert_eq!(y[40], 1.5);
        assert!((y[50] + 0.375).abs() < 1e-6, "{}", y[50]);
        assert!(y[..3].iter().all(|v| *v == 0.0));
        let z = q4_0(&[0f32; 32]);
        assert_eq!(dequantize_q4_0(&z), vec![0f32; 32]);
    }
}
