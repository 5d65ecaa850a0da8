"""What PIL's JPEG decoding is, step by step, and where the image crate's zune-jpeg departs from
it: a small reference decoder checked pixel for pixel against `Image.open(p).convert("RGB")`.

PIL decodes with libjpeg-turbo at its defaults. This script rebuilds that decode from the
quantised DCT coefficients with three stages and finds it identical to PIL's on every case:
  1. IDCT: jidctint.c `jpeg_idct_islow` (JDCT_ISLOW: 13-bit constants, 2 extra bits after the
     column pass, the output wrapped through libjpeg's range-limit table);
  2. chroma upsampling: jdsample.c "fancy" upsampling of the component's real samples
     (`downsampled_width` x `downsampled_height`, edge samples replicated), 4:2:0 in one step
     with a single rounding, `(3*a + b + 8) >> 4` / `(3*a + c + 7) >> 4`, 4:2:2 with biases 1 and
     2, and plain replication when the subsampled width is 2 or less;
  3. colour: jdcolor.c's 16-bit fixed-point YCbCr->RGB tables.
It then swaps each stage for zune-jpeg 0.5's (as read from its scalar code: stb_image's 12-bit
IDCT, a vertical pass rounded before the horizontal one with bias 2 on both sides, applied to
the block-padded chroma planes so that the last real column and row interpolate towards padding,
and 14-bit colour coefficients) and prints how far each swap alone, and all three, are from PIL.
With all three swapped the model gave zune-jpeg 0.5.15's own output (through the image crate),
byte for byte, on about 200 files of 1 to 1000 pixels a side when it was written.

Only baseline sequential JPEGs without restart intervals are parsed (progressive files carry the
same coefficients). Usage: python tools/jpeg/pil_model.py  (needs Pillow and numpy; writes only
to a temporary folder; CI never runs it)
"""
import math
import os
import tempfile

import numpy as np
from PIL import Image

ZIGZAG = np.array([
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27,
    20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58,
    59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63])


def read_jpeg(data):
    """(height, width, components, quantisation tables); each component gets `coef`, its
    dequantised blocks [rows of blocks, blocks, 8, 8], and its sampling factors."""
    i, tables, huffman, comps, height, width = 2, {}, {}, [], 0, 0
    while True:
        marker = data[i + 1]
        if marker == 0xD9:
            break
        length = data[i + 2] << 8 | data[i + 3]
        seg = data[i + 4:i + 2 + length]
        if marker == 0xDB:
            j = 0
            while j < len(seg):
                size = 2 if seg[j] >> 4 else 1
                values = [int.from_bytes(seg[j + 1 + k * size:j + 1 + (k + 1) * size], "big") for k in range(64)]
                tables[seg[j] & 15] = np.zeros(64, np.int64)
                tables[seg[j] & 15][ZIGZAG] = values
                j += 1 + 64 * size
        elif marker in (0xC0, 0xC1):
            height, width = seg[1] << 8 | seg[2], seg[3] << 8 | seg[4]
            for k in range(seg[5]):
                cid, hv, tq = seg[6 + 3 * k:9 + 3 * k]
                comps.append(dict(id=cid, h=hv >> 4, v=hv & 15, tq=tq))
        elif marker == 0xC2:
            raise ValueError("progressive JPEGs are not parsed here")
        elif marker == 0xDD and (seg[0] or seg[1]):
            raise ValueError("restart intervals are not parsed here")
        elif marker == 0xC4:
            j = 0
            while j < len(seg):
                counts, codes, code, k = seg[j + 1:j + 17], {}, 0, 0
                for bits in range(1, 17):
                    for _ in range(counts[bits - 1]):
                        codes[(bits, code)] = seg[j + 17 + k]
                        k, code = k + 1, code + 1
                    code <<= 1
                huffman[(seg[j] >> 4, seg[j] & 15)] = codes
                j += 17 + k
        elif marker == 0xDA:
            scan = [(seg[1 + 2 * k], seg[2 + 2 * k] >> 4, seg[2 + 2 * k] & 15) for k in range(seg[0])]
            j = i + 2 + length
            end = j
            while not (data[end] == 0xFF and data[end + 1] != 0):
                end += 1
            read_scan(data[j:end], scan, comps, huffman, height, width)
            i = end
            continue
        i += 2 + length
    for c in comps:
        c["coef"] = c["coef"] * tables[c["tq"]].reshape(8, 8)
    return height, width, comps


def read_scan(entropy, scan, comps, huffman, height, width):
    data = entropy.replace(b"\xff\x00", b"\xff")
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    pos = 0

    def read(n):
        nonlocal pos
        value = 0
        for _ in range(n):
            value, pos = value << 1 | int(bits[pos]), pos + 1
        return value

    def symbol(codes):
        code = 0
        for length in range(1, 17):
            code = code << 1 | read(1)
            if (length, code) in codes:
                return codes[(length, code)]
        raise ValueError("bad Huffman code")

    def extend(v, t):
        return v - (1 << t) + 1 if t and v < 1 << (t - 1) else v

    hmax, vmax = max(c["h"] for c in comps), max(c["v"] for c in comps)
    by_id = {c["id"]: c for c in comps}
    for c in comps:
        c["bw"] = math.ceil(math.ceil(width * c["h"] / hmax) / 8)
        c["bh"] = math.ceil(math.ceil(height * c["v"] / vmax) / 8)
        c["coef"] = np.zeros((max(c["bh"], math.ceil(height / 8 / vmax) * c["v"]),
                              max(c["bw"], math.ceil(width / 8 / hmax) * c["h"]), 8, 8), np.int64)
        c["pred"] = 0

    def block(c, dc_table, ac_table):
        t = symbol(huffman[(0, dc_table)])
        c["pred"] += extend(read(t), t)
        zz = np.zeros(64, np.int64)
        zz[0], k = c["pred"], 1
        while k < 64:
            rs = symbol(huffman[(1, ac_table)])
            if rs & 15 == 0:
                if rs >> 4 != 15:
                    break
                k += 16
                continue
            k += rs >> 4
            zz[k] = extend(read(rs & 15), rs & 15)
            k += 1
        out = np.zeros(64, np.int64)
        out[ZIGZAG] = zz
        return out.reshape(8, 8)

    if len(scan) == 1:
        c = by_id[scan[0][0]]
        for by in range(c["bh"]):
            for bx in range(c["bw"]):
                c["coef"][by, bx] = block(c, scan[0][1], scan[0][2])
        return
    for my in range(math.ceil(height / (8 * vmax))):
        for mx in range(math.ceil(width / (8 * hmax))):
            for cid, dc_table, ac_table in scan:
                c = by_id[cid]
                for v in range(c["v"]):
                    for h in range(c["h"]):
                        c["coef"][my * c["v"] + v, mx * c["h"] + h] = block(c, dc_table, ac_table)


def idct_islow_pass(s, shift):
    """One pass of jidctint.c's jpeg_idct_islow over axis 1 of s [n, 8, 8]."""
    z1 = (s[:, 2] + s[:, 6]) * 4433
    tmp2, tmp3 = z1 - s[:, 6] * 15137, z1 + s[:, 2] * 6270
    tmp0, tmp1 = (s[:, 0] + s[:, 4]) << 13, (s[:, 0] - s[:, 4]) << 13
    t10, t13, t11, t12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    tmp0, tmp1, tmp2, tmp3 = s[:, 7], s[:, 5], s[:, 3], s[:, 1]
    z5 = (tmp0 + tmp2 + tmp1 + tmp3) * 9633
    z1, z2 = (tmp0 + tmp3) * -7373, (tmp1 + tmp2) * -20995
    z3, z4 = (tmp0 + tmp2) * -16069 + z5, (tmp1 + tmp3) * -3196 + z5
    tmp0, tmp1 = tmp0 * 2446 + z1 + z3, tmp1 * 16819 + z2 + z4
    tmp2, tmp3 = tmp2 * 25172 + z2 + z3, tmp3 * 12299 + z1 + z4
    out = (t10 + tmp3, t11 + tmp2, t12 + tmp1, t13 + tmp0, t13 - tmp0, t12 - tmp1, t11 - tmp2, t10 - tmp3)
    return np.stack([(v + (1 << (shift - 1))) >> shift for v in out], 1)


def idct_islow(blocks):
    rows = idct_islow_pass(idct_islow_pass(blocks, 11).transpose(0, 2, 1), 18).transpose(0, 2, 1)
    x = rows & 1023  # libjpeg's post-IDCT range-limit table
    return np.where(x < 128, x + 128, np.where(x < 512, 255, np.where(x < 896, 0, x - 896)))


def idct_stb_pass(s, first):
    """One pass of stb_image's IDCT as zune-jpeg's idct/scalar.rs has it."""
    p1 = (s[:, 2] + s[:, 6]) * 2217
    t2, t3 = p1 - s[:, 6] * 7567, p1 + s[:, 2] * 3135
    t0, t1 = (s[:, 0] + s[:, 4]) << 12, (s[:, 0] - s[:, 4]) << 12
    bias = 512 if first else 512 + 65536 + (128 << 17)
    x0, x3, x1, x2 = t0 + t3 + bias, t0 - t3 + bias, t1 + t2 + bias, t1 - t2 + bias
    t0, t1, t2, t3 = s[:, 7], s[:, 5], s[:, 3], s[:, 1]
    p5 = (t0 + t2 + t1 + t3) * 4816
    p1, p2 = p5 + (t0 + t3) * -3685, p5 + (t1 + t2) * -10497
    p3, p4 = (t0 + t2) * -8034, (t1 + t3) * -1597
    t0, t1, t2, t3 = t0 * 1223 + p1 + p3, t1 * 8410 + p2 + p4, t2 * 12586 + p2 + p3, t3 * 6149 + p1 + p4
    shift = 10 if first else 17
    return np.stack([v >> shift for v in (x0 + t3, x1 + t2, x2 + t1, x3 + t0, x3 - t0, x2 - t1, x1 - t2, x0 - t3)], 1)


def idct_stb(blocks):
    rows = idct_stb_pass(idct_stb_pass(blocks, True).transpose(0, 2, 1), False).transpose(0, 2, 1)
    return np.clip(rows, 0, 255)


def neighbours(p, axis):
    """The previous and next samples along an axis, the edge samples repeated."""
    first, last = np.take(p, [0], axis), np.take(p, [-1], axis)
    n = p.shape[axis]
    return (np.concatenate([first, np.take(p, range(n - 1), axis)], axis),
            np.concatenate([np.take(p, range(1, n), axis), last], axis))


def interleave(even, odd, axis):
    out = np.stack([even, odd], axis + 1)
    shape = list(even.shape)
    shape[axis] *= 2
    return out.reshape(shape)


def upsample_libjpeg(p, h2, v2):
    if h2 and p.shape[1] <= 2:
        return np.repeat(np.repeat(p, 2, 1), 2 if v2 else 1, 0)
    if v2:
        above, below = neighbours(p, 0)
        p = interleave(3 * p + above, 3 * p + below, 0)  # column sums, not yet rounded
        if not h2:
            return interleave((p[0::2] + 1) >> 2, (p[1::2] + 2) >> 2, 0)
        left, right = neighbours(p, 1)
        return interleave((3 * p + left + 8) >> 4, (3 * p + right + 7) >> 4, 1)
    if h2:
        left, right = neighbours(p, 1)
        return interleave((3 * p + left + 1) >> 2, (3 * p + right + 2) >> 2, 1)
    return p


def upsample_zune(p, h2, v2):
    if v2:
        above, below = neighbours(p, 0)
        p = interleave((3 * p + above + 2) >> 2, (3 * p + below + 2) >> 2, 0)
    if h2:
        left, right = neighbours(p, 1)
        out = interleave((3 * p + left + 2) >> 2, (3 * p + right + 2) >> 2, 1)
        out[:, 0], out[:, -1] = p[:, 0], p[:, -1]
        p = out
    return p


def fix16(x):
    return int(x * 65536 + 0.5)


def colour_libjpeg(y, cb, cr):
    cb, cr = cb - 128, cr - 128
    return (y + ((fix16(1.402) * cr + 32768) >> 16),
            y + ((-fix16(0.34414) * cb + 32768 - fix16(0.71414) * cr) >> 16),
            y + ((fix16(1.772) * cb + 32768) >> 16))


def colour_zune(y, cb, cr):
    cb, cr, y0 = cb - 128, cr - 128, y * 16384 + 8191
    return (y0 + cr * 22970) >> 14, (y0 - cr * 11700 - cb * 5638) >> 14, (y0 + cb * 29032) >> 14


def decode(path, idct="libjpeg", upsample="libjpeg", colour="libjpeg"):
    """uint8 [H, W, 3] with each stage taken from libjpeg-turbo or zune-jpeg."""
    height, width, comps = read_jpeg(open(path, "rb").read())
    hmax, vmax = max(c["h"] for c in comps), max(c["v"] for c in comps)
    planes = []
    for c in comps:
        rows, cols = c["coef"].shape[:2]
        blocks = c["coef"].reshape(-1, 8, 8)
        pixels = (idct_stb if idct == "zune" else idct_islow)(blocks)
        plane = pixels.reshape(rows, cols, 8, 8).transpose(0, 2, 1, 3).reshape(rows * 8, cols * 8)
        h2, v2 = c["h"] * 2 == hmax, c["v"] * 2 == vmax
        if upsample == "zune":  # zune upsamples the whole block-padded plane
            plane = upsample_zune(plane[:c["bh"] * 8, :c["bw"] * 8], h2, v2)
        else:
            real_h, real_w = math.ceil(height * c["v"] / vmax), math.ceil(width * c["h"] / hmax)
            plane = upsample_libjpeg(plane[:real_h, :real_w], h2, v2)
        planes.append(plane[:height, :width])
    if len(planes) == 1:
        return np.repeat(planes[0][..., None], 3, -1).astype(np.uint8)
    rgb = (colour_zune if colour == "zune" else colour_libjpeg)(*planes)
    return np.clip(np.stack(rgb, -1), 0, 255).astype(np.uint8)


def photo(h, w, seed):
    """Gradients, a sine pattern, hard edges and noise, uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1),
                     128 + 100 * np.sin(x / 3.0) * np.cos(y / 5.0)], -1)
    base[(x // 9 + y // 7) % 2 == 0] *= 0.6
    return np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)


def cases(folder):
    for h, w in [(48, 64), (53, 37), (46, 60), (75, 100), (9, 4), (5, 3)]:
        rgb = photo(h, w, h * w)
        for quality in (75, 95):
            for subsampling, name in ((0, "444"), (1, "422"), (2, "420")):
                path = os.path.join(folder, f"{w}x{h}_q{quality}_{name}.jpg")
                Image.fromarray(rgb).save(path, quality=quality, subsampling=subsampling)
                yield path
            path = os.path.join(folder, f"{w}x{h}_q{quality}_grey.jpg")
            Image.fromarray(rgb.mean(-1).astype(np.uint8)).save(path, quality=quality)
            yield path


def difference(a, b):
    d = np.abs(a.astype(int) - b.astype(int))
    return f"{d.max():3d} {100 * np.mean(d > 0):5.1f}%"


def main():
    swaps = {"idct": dict(idct="zune"), "upsample": dict(upsample="zune"), "colour": dict(colour="zune"),
             "all three": dict(idct="zune", upsample="zune", colour="zune")}
    print("max |difference| from PIL in levels, share of values differing: the libjpeg-turbo model,")
    print("then the model with zune-jpeg's IDCT, upsampling, colour conversion, and all three")
    print(f"{'case':20s} {'model':>11s}" + "".join(f"{name:>12s}" for name in swaps))
    with tempfile.TemporaryDirectory() as folder:
        for path in cases(folder):
            pil = np.asarray(Image.open(path).convert("RGB"))
            model = decode(path)
            row = f"{os.path.basename(path)[:-4]:20s} {difference(model, pil):>11s}"
            row += "".join(f"{difference(decode(path, **s), pil):>12s}" for s in swaps.values())
            print(row)
            assert np.array_equal(model, pil), path


if __name__ == "__main__":
    main()
