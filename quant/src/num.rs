//! Number formats and the per-channel / per-block quantizers shared by every file format.

use half::{bf16, f16};

/// Largest magnitude of a symmetric int8 code.
pub const INT8_MAX: f32 = 127.0;
/// int4 codes span [-8, 7].
pub const INT4_MIN: f32 = -8.0;
pub const INT4_MAX: f32 = 7.0;
/// Scales tried per int4 block, as multiples of `absmax / 8`: with only 16 levels, a fine
/// search over clipping pays off far more than for int8.
const INT4_RATIOS: usize = 24;

/// Clipping ratios tried for each channel: the scale that minimises the squared
/// quantization error wins, so a few outliers do not flatten the rest of the channel.
const CLIP_RATIOS: [f32; 8] = [1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.7, 0.6];

pub fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

pub fn bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

pub fn f16_value(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

pub fn bf16_value(bits: u16) -> f32 {
    bf16::from_bits(bits).to_f32()
}

/// Whether every value fits float16 without turning into infinity.
pub fn fits_f16(values: &[f32]) -> bool {
    values
        .iter()
        .all(|v| !v.is_finite() || v.abs() <= f16::MAX.to_f32())
}

/// Adding then subtracting 1.5 × 2^23 rounds a float of magnitude below 2^22 to an integer
/// (ties to even) in two vectorizable additions, where `f32::round` is a library call.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
fn round_code(x: f32, inv_scale: f32, lo: f32, hi: f32) -> f32 {
    ((x * inv_scale).clamp(lo, hi) + ROUND_MAGIC) - ROUND_MAGIC
}

/// Lanes of the hand-vectorized reductions: float sums and maxima are not reassociated by
/// the compiler, so they are split into independent accumulators it can keep in a vector.
const LANES: usize = 8;

/// Squared error of quantizing `values` with `scale` (codes in `[lo, hi]`).
#[inline(always)]
fn squared_error(values: &[f32], scale: f32, lo: f32, hi: f32) -> f32 {
    let inv = 1.0 / scale;
    let err = |v: f32| {
        let d = v - round_code(v, inv, lo, hi) * scale;
        d * d
    };
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| err(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += err(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest magnitude of `values`.
#[inline(always)]
fn abs_max(values: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(0f32, |m, v| m.max(v.abs()));
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            let x = v.abs();
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// The scale for `values` (all finite) with codes in `[-max, max]` that minimises the
/// squared error of quantizing and dequantizing them (0 when every value is 0).
#[inline(always)]
pub fn best_scale(values: &[f32], max: f32) -> f32 {
    let absmax = abs_max(values);
    if absmax == 0.0 || !absmax.is_finite() {
        return 0.0;
    }
    let mut best = (f32::INFINITY, absmax / max);
    for ratio in CLIP_RATIOS {
        let scale = ratio * absmax / max;
        let err = squared_error(values, scale, -max, max);
        if err < best.0 {
            best = (err, scale);
        }
    }
    best.1
}

/// The int4 scale (codes in [-8, 7]) for a block (all finite) that minimises the squared
/// error.
#[inline(always)]
pub fn best_scale_int4(values: &[f32]) -> f32 {
    let absmax = abs_max(values);
    if absmax == 0.0 || !absmax.is_finite() {
        return 0.0;
    }
    let mut best = (f32::INFINITY, absmax / INT4_MAX);
    for step in 0..INT4_RATIOS {
        // From absmax / 7 (nothing clipped) down to half of absmax / 8.
        let scale = absmax / INT4_MAX * (1.0 - step as f32 * 0.55 / INT4_RATIOS as f32);
        let err = squared_error(values, scale, INT4_MIN, INT4_MAX);
        if err < best.0 {
            best = (err, scale);
        }
    }
    best.1
}

/// Non-finite values quantize as 0.
#[inline(always)]
fn finite(v: f32) -> f32 {
    if v.is_finite() { v } else { 0.0 }
}

/// Symmetric codes of `values` (all finite) for `scale` into `out` (all 0 when the scale
/// is 0).
#[inline(always)]
pub fn codes_into(values: &[f32], scale: f32, max: f32, out: &mut [i8]) {
    if scale == 0.0 {
        out.fill(0);
        return;
    }
    let inv = 1.0 / scale;
    for (q, &v) in out.iter_mut().zip(values) {
        *q = code_i8(v, inv, max);
    }
}

/// The int8 code of `x`: after adding `ROUND_MAGIC`, a code's two's complement sits in the
/// float's low mantissa bits, so the byte is read from the bits rather than through a
/// float-to-integer conversion (which does not vectorize).
#[inline(always)]
fn code_i8(x: f32, inv_scale: f32, max: f32) -> i8 {
    ((x * inv_scale).clamp(-max, max) + ROUND_MAGIC).to_bits() as u8 as i8
}

/// One channel's quantization (read its values, search its scale, write its codes), run
/// through `pulp`'s dispatch: compiled for the widest vector instructions this CPU has
/// (AVX2 and FMA, detected at run time; the baseline's SSE2 elsewhere). The loops are
/// written so the compiler vectorizes them, and everything they call is
/// `#[inline(always)]`, so it is compiled inside the dispatched function with those
/// instructions. Floats are never contracted or reassociated, so the results are the same
/// bits on every CPU.
struct Channel<'a, V: ?Sized> {
    values: &'a V,
    view: ChannelView,
    index: usize,
    max: f32,
    data: &'a mut Vec<f32>,
    codes: &'a mut [i8],
}

impl<V: Floats + ?Sized> pulp::WithSimd for Channel<'_, V> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> f32 {
        let view = self.view;
        // Every channel of a tensor has the same length: after the first, this neither
        // grows nor fills the buffer, and the values overwrite it in place.
        self.data.resize(view.outer * view.inner, 0.0);
        for (o, run) in self.data.chunks_exact_mut(view.inner.max(1)).enumerate() {
            self.values.read_finite(view.index(o, self.index, 0), run);
        }
        let scale = best_scale(self.data, self.max);
        codes_into(self.data, scale, self.max, self.codes);
        scale
    }
}

/// An int4 block's scale search, dispatched as `Channel` is.
struct Int4Block<'a>(&'a [f32]);

impl pulp::WithSimd for Int4Block<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> f32 {
        best_scale_int4(self.0)
    }
}

/// A tensor's elements viewed as `[outer, channels, inner]` around `axis`.
#[derive(Clone, Copy, Debug)]
pub struct ChannelView {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
}

impl ChannelView {
    pub fn new(dims: &[usize], axis: usize) -> Self {
        Self {
            outer: dims[..axis].iter().product(),
            channels: dims[axis],
            inner: dims[axis + 1..].iter().product(),
        }
    }

    fn index(&self, o: usize, c: usize, i: usize) -> usize {
        (o * self.channels + c) * self.inner + i
    }
}

/// Tensors at least this large are quantized on several threads.
const PARALLEL_ELEMENTS: usize = 1 << 16;

thread_local! {
    /// Threads one quantization on this thread may use (0: every core).
    static MAX_THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `work` (a transform, on the calling thread) with each tensor's quantization
/// limited to `threads` threads (a node leaves cores for serving); 0 means every core.
/// The limit belongs to this call alone: two callers with different limits, in one process
/// or one thread after the other, do not affect each other.
pub fn with_max_threads<R>(threads: usize, work: impl FnOnce() -> R) -> R {
    let previous = MAX_THREADS.replace(threads);
    let result = work();
    MAX_THREADS.set(previous);
    result
}

fn threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match MAX_THREADS.get() {
        0 => cores,
        n => n.min(cores),
    }
}

/// Float values a quantizer reads a run at a time: a slice of `f32`, or the little-endian
/// bytes of one (decoded a run at a time, so a tensor is never held twice as floats).
pub trait Floats: Sync {
    /// How many values there are.
    fn count(&self) -> usize;
    /// Writes values `start..start + out.len()` into `out`, NaN and infinities as 0.
    fn read_finite(&self, start: usize, out: &mut [f32]);
}

impl Floats for [f32] {
    fn count(&self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn read_finite(&self, start: usize, out: &mut [f32]) {
        let values = &self[start..start + out.len()];
        for (o, &v) in out.iter_mut().zip(values) {
            *o = finite(v);
        }
    }
}

/// Little-endian `f32` bytes (a length that is a multiple of 4).
pub struct LeF32<'a>(pub &'a [u8]);

impl Floats for LeF32<'_> {
    fn count(&self) -> usize {
        self.0.len() / 4
    }

    #[inline(always)]
    fn read_finite(&self, start: usize, out: &mut [f32]) {
        let bytes = self.0[start * 4..(start + out.len()) * 4].chunks_exact(4);
        for (o, b) in out.iter_mut().zip(bytes) {
            *o = finite(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
    }
}

/// Per-channel symmetric quantization along a view's channel axis: one scale per channel,
/// channels spread over the available cores for large tensors.
pub fn quantize_per_channel<V: Floats + ?Sized>(
    values: &V,
    view: ChannelView,
    max: f32,
) -> (Vec<f32>, Vec<i8>) {
    let len = values.count();
    let mut scales = vec![0f32; view.channels];
    let mut out = vec![0i8; len];
    if len == 0 {
        return (scales, out);
    }
    let threads = if len >= PARALLEL_ELEMENTS {
        threads().min(view.channels)
    } else {
        1
    };
    let step = view.channels.div_ceil(threads);
    // Quantizes channel `c` into `codes`, returning its scale.
    let arch = pulp::Arch::new();
    let channel = |index: usize, data: &mut Vec<f32>, codes: &mut [i8]| {
        arch.dispatch(Channel {
            values,
            view,
            index,
            max,
            data,
            codes,
        })
    };
    if view.outer == 1 {
        // Each channel is one contiguous run of the output: threads fill disjoint parts.
        let run = |first: usize, scales: &mut [f32], out: &mut [i8]| {
            let mut data = Vec::with_capacity(view.inner);
            for (k, (scale, codes)) in scales
                .iter_mut()
                .zip(out.chunks_mut(view.inner))
                .enumerate()
            {
                *scale = channel(first + k, &mut data, codes);
            }
        };
        std::thread::scope(|scope| {
            for (i, (scales, out)) in scales
                .chunks_mut(step)
                .zip(out.chunks_mut(step * view.inner))
                .enumerate()
            {
                let run = &run;
                if i + 1 == threads {
                    run(i * step, scales, out);
                } else {
                    scope.spawn(move || run(i * step, scales, out));
                }
            }
        });
    } else {
        // Strided channels: each thread quantizes its channels apart, then they are
        // scattered into place.
        let run = |first: usize, scales: &mut [f32]| {
            let mut data = Vec::with_capacity(view.outer * view.inner);
            let mut codes = vec![0i8; view.outer * view.inner];
            let mut all = Vec::with_capacity(scales.len() * codes.len());
            for (k, scale) in scales.iter_mut().enumerate() {
                *scale = channel(first + k, &mut data, &mut codes);
                all.extend_from_slice(&codes);
            }
            all
        };
        let parts: Vec<Vec<i8>> = std::thread::scope(|scope| {
            let workers: Vec<_> = scales
                .chunks_mut(step)
                .enumerate()
                .map(|(i, scales)| {
                    let run = &run;
                    scope.spawn(move || run(i * step, scales))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("quantizer thread"))
                .collect()
        });
        let per_channel = view.outer * view.inner;
        for (c, codes) in parts.iter().flat_map(|p| p.chunks(per_channel)).enumerate() {
            for (o, part) in codes.chunks(view.inner).enumerate() {
                let start = view.index(o, c, 0);
                out[start..start + view.inner].copy_from_slice(part);
            }
        }
    }
    (scales, out)
}

/// Block-wise int4 along axis 0 of a `[rows, cols]` matrix, blocks of `block` rows:
/// scales are `[ceil(rows / block), cols]`, codes in `[-8, 7]`.
pub fn quantize_blocks_axis0(
    values: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
) -> (Vec<f32>, Vec<i8>) {
    let blocks = rows.div_ceil(block);
    let mut scales = vec![0f32; blocks * cols];
    let mut out = vec![0i8; values.len()];
    let mut column = Vec::with_capacity(block);
    let mut q = Vec::new();
    let arch = pulp::Arch::new();
    for b in 0..blocks {
        let (start, end) = (b * block, ((b + 1) * block).min(rows));
        for c in 0..cols {
            column.clear();
            column.extend((start..end).map(|r| values[r * cols + c]));
            let scale = arch.dispatch(Int4Block(&column));
            q.clear();
            if scale == 0.0 {
                q.resize(column.len(), 0);
            } else {
                let inv = 1.0 / scale;
                q.extend(
                    column
                        .iter()
                        .map(|&v| round_code(v, inv, INT4_MIN, INT4_MAX) as i8),
                );
            }
            for (k, r) in (start..end).enumerate() {
                out[r * cols + c] = q[k];
            }
            scales[b * cols + c] = scale;
        }
    }
    (scales, out)
}

/// Packs int4 codes two per byte, the first in the low nibble (ONNX INT4 layout).
pub fn pack_int4(codes: &[i8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|pair| {
            let lo = (pair[0] as u8) & 0x0f;
            let hi = pair.get(1).map_or(0, |&v| (v as u8) & 0x0f);
            lo | (hi << 4)
        })
        .collect()
}

/// ggml's rounding (`roundf`): halves away from zero.
fn ggml_round(x: f32) -> f32 {
    x.round()
}

pub const GGML_BLOCK: usize = 32;

/// One row of Q8_0 blocks, as ggml and `gguf.quants` write them: per 32 values an f16
/// scale `absmax / 127` then 32 int8 codes.
pub fn q8_0_row(row: &[f32], out: &mut Vec<u8>) {
    for block in row.chunks(GGML_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16_bits(d).to_le_bytes());
        out.extend(block.iter().map(|&v| ggml_round(v * id) as i8 as u8));
    }
}

/// One row of Q4_0 blocks: per 32 values an f16 scale `max / -8` (the signed value of
/// largest magnitude) then 16 bytes, value `j` in the low nibble of byte `j` and value
/// `j + 16` in its high nibble, codes offset by 8.
pub fn q4_0_row(row: &[f32], out: &mut Vec<u8>) {
    for block in row.chunks(GGML_BLOCK) {
        let mut max = 0f32;
        let mut amax = 0f32;
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16_bits(d).to_le_bytes());
        let code = |v: f32| ((v * id + 8.5).trunc() as i32).clamp(0, 15) as u8;
        for j in 0..GGML_BLOCK / 2 {
            out.push(code(block[j]) | (code(block[j + GGML_BLOCK / 2]) << 4));
        }
    }
}

/// Little-endian f32 values of `bytes` (whose length is a multiple of 4).
pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn f16_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f16_value(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

pub fn bf16_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| bf16_value(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| f16_bits(v).to_le_bytes())
        .collect()
}

pub fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| bf16_bits(v).to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_scales_follow_each_channel() {
        // Two channels along axis 0 whose magnitudes differ by 1000×.
        let values: Vec<f32> = (0..64)
            .map(|i| if i < 32 { i as f32 * 0.001 } else { i as f32 })
            .collect();
        let (scales, q) =
            quantize_per_channel(&values[..], ChannelView::new(&[2, 32], 0), INT8_MAX);
        assert_eq!(scales.len(), 2);
        assert!(scales[1] / scales[0] > 500.0, "{scales:?}");
        for (i, (&v, &c)) in values.iter().zip(&q).enumerate() {
            let back = c as f32 * scales[i / 32];
            assert!((back - v).abs() <= scales[i / 32], "{i}: {v} vs {back}");
        }
    }

    #[test]
    fn threaded_contiguous_and_strided_channels_match_one_channel_at_a_time() {
        // Over `PARALLEL_ELEMENTS`, so channels are spread over threads; a NaN and an
        // infinity quantize as 0 and do not set their channel's scale.
        let dims = [3, 700, 500];
        let mut values: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * (1.0 + (i % 700) as f32 / 100.0))
            .collect();
        values[12] = f32::NAN;
        values[5000] = f32::INFINITY;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for axis in 0..3 {
            let view = ChannelView::new(&dims, axis);
            let (scales, q) = quantize_per_channel(&values[..], view, INT8_MAX);
            assert_eq!(
                (scales.clone(), q.clone()),
                quantize_per_channel(&LeF32(&bytes), view, INT8_MAX),
                "axis {axis}"
            );
            for (c, &got) in scales.iter().enumerate() {
                let mut data = vec![0f32; view.outer * view.inner];
                for (o, run) in data.chunks_exact_mut(view.inner).enumerate() {
                    values[..].read_finite(view.index(o, c, 0), run);
                }
                let scale = best_scale(&data, INT8_MAX);
                assert_eq!(got, scale, "axis {axis} channel {c}");
                let mut codes = vec![0i8; data.len()];
                codes_into(&data, scale, INT8_MAX, &mut codes);
                for o in 0..view.outer {
                    let start = view.index(o, c, 0);
                    let part = &codes[o * view.inner..(o + 1) * view.inner];
                    assert_eq!(
                        &q[start..start + view.inner],
                        part,
                        "axis {axis} channel {c}"
                    );
                }
            }
        }
        assert_eq!(
            quantize_per_channel(&values[..], ChannelView::new(&dims, 0), INT8_MAX).1[12],
            0
        );
    }

    #[test]
    fn codes_round_to_nearest_even_and_saturate() {
        let values = [
            0.0, 0.5, 1.5, -0.5, -1.5, -2.5, 126.6, 200.0, -200.0, -0.2, 3.49,
        ];
        let mut q = [0i8; 11];
        codes_into(&values, 1.0, INT8_MAX, &mut q);
        assert_eq!(q, [0, 0, 2, 0, -2, -2, 127, 127, -127, 0, 3]);
    }

    #[test]
    fn clipping_search_beats_absmax_on_outliers() {
        let mut values: Vec<f32> = (0..1024).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
        values[5] = 10.0;
        let scale = best_scale(&values, INT8_MAX);
        assert!(scale <= 10.0 / 127.0);
    }

    #[test]
    fn q4_0_packs_like_ggml() {
        let row: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let mut out = Vec::new();
        q4_0_row(&row, &mut out);
        assert_eq!(out.len(), 18);
        // max magnitude is -16 → d = 2; value -16 → code 0, value 15 → trunc(7.5+8.5)=16 → 15.
        assert_eq!(f16_value(u16::from_le_bytes([out[0], out[1]])), 2.0);
        assert_eq!(out[2] & 0x0f, 0);
        assert_eq!(out[17] >> 4, 15);
    }

    #[test]
    fn int4_packing_is_low_nibble_first() {
        assert_eq!(pack_int4(&[1, -1, 7]), vec![0xf1, 0x07]);
    }
}
