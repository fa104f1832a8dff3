//! A minimal PNG encoder for 8-bit RGB images.
//!
//! plotters' own PNG output writes straight to a path chosen by extension, which rules out the
//! write-to-`.tmp`-then-rename scheme of [`super::write_atomic`] and the supersampling done in
//! `figure`. So the figure is rendered into memory and encoded here, with the zlib stream from
//! `flate2` (already a dependency for the gzip'd MNIST files).

use std::io::Write as _;

use flate2::write::ZlibEncoder;
use flate2::{Compression, Crc};

/// Encodes a row-major RGB buffer (`3 * width * height` bytes) as PNG.
pub fn encode_rgb(width: u32, height: u32, rgb: &[u8]) -> std::io::Result<Vec<u8>> {
    let row = 3 * width as usize;
    if rgb.len() != row * height as usize || width == 0 || height == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "RGB buffer of {} bytes does not fit {width}x{height}",
                rgb.len()
            ),
        ));
    }
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // bit depth 8, colour type 2 (RGB), deflate, standard filtering, no interlace
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);

    // The "Up" filter (type 2) turns the long flat runs of a chart into zeros, which deflate
    // compresses far better than raw pixels.
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    let mut line = vec![0u8; row + 1];
    for y in 0..height as usize {
        let cur = &rgb[y * row..(y + 1) * row];
        line[0] = 2;
        if y == 0 {
            line[1..].copy_from_slice(cur);
        } else {
            let prev = &rgb[(y - 1) * row..y * row];
            for (o, (c, p)) in line[1..].iter_mut().zip(cur.iter().zip(prev)) {
                *o = c.wrapping_sub(*p);
            }
        }
        z.write_all(&line)?;
    }
    chunk(&mut out, b"IDAT", &z.finish()?);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_ihdr() {
        let png = encode_rgb(3, 2, &[7u8; 18]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes([png[16], png[17], png[18], png[19]]), 3);
        assert_eq!(u32::from_be_bytes([png[20], png[21], png[22], png[23]]), 2);
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
        // CRC of an empty IEND chunk is a well-known constant.
        assert_eq!(&png[png.len() - 4..], &[0xae, 0x42, 0x60, 0x82]);
    }

    #[test]
    fn wrong_size_is_an_error() {
        assert!(encode_rgb(3, 2, &[0u8; 17]).is_err());
    }
}
