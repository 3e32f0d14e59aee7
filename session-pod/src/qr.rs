//! QR code output for `GET /v1/qr`: a PNG for pages and a Unicode half-block drawing for
//! terminals, both from the `qrcode` module matrix.
//!
//! The PNG is written with the `png` crate at one bit per pixel: a 60-module code at 8 pixels
//! per module is a few kilobytes, built without any image library in memory.

use qrcode::{Color, EcLevel, QrCode};

/// Light modules around the code; the QR specification asks for four.
pub const QUIET_ZONE: usize = 4;
/// Pixels per module in the PNG: big enough for a phone camera on any screen.
pub const PNG_SCALE: usize = 8;

/// The dark/light modules of a QR code, row by row, without the quiet zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrMatrix {
    width: usize,
    dark: Vec<bool>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot encode this text as a QR code: {0}")]
pub struct QrError(String);

impl QrMatrix {
    /// Encodes `text` with error correction level L, as WhatsApp Web does (the codes are long;
    /// a lower level keeps the modules larger on screen).
    pub fn encode(text: &str) -> Result<Self, QrError> {
        let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::L)
            .map_err(|e| QrError(e.to_string()))?;
        let width = code.width();
        let dark = code
            .into_colors()
            .into_iter()
            .map(|c| c == Color::Dark)
            .collect();
        Ok(Self { width, dark })
    }

    /// Modules per side, without the quiet zone.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Whether the module at (x, y) is dark; coordinates include the quiet zone, so anything
    /// outside the code is light.
    fn is_dark_with_margin(&self, x: usize, y: usize) -> bool {
        let (Some(x), Some(y)) = (x.checked_sub(QUIET_ZONE), y.checked_sub(QUIET_ZONE)) else {
            return false;
        };
        x < self.width && y < self.width && self.dark[y * self.width + x]
    }

    fn side_with_margin(&self) -> usize {
        self.width + 2 * QUIET_ZONE
    }

    /// A 1-bit grayscale PNG, `scale` pixels per module, with the quiet zone.
    pub fn to_png(&self, scale: usize) -> Result<Vec<u8>, QrError> {
        let scale = scale.max(1);
        let side_px = self.side_with_margin() * scale;
        let side = u32::try_from(side_px).map_err(|_| QrError("image too large".into()))?;
        let row_bytes = side_px.div_ceil(8);
        let mut pixels = vec![0u8; row_bytes * side_px];
        for y_px in 0..side_px {
            let row = &mut pixels[y_px * row_bytes..(y_px + 1) * row_bytes];
            for x_px in 0..side_px {
                // Grayscale 1-bit: 1 is white. Dark modules stay 0.
                if !self.is_dark_with_margin(x_px / scale, y_px / scale) {
                    row[x_px / 8] |= 0x80 >> (x_px % 8);
                }
            }
        }
        let mut out = Vec::with_capacity(pixels.len() / 4 + 128);
        let mut encoder = png::Encoder::new(&mut out, side, side);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::One);
        let mut writer = encoder.write_header().map_err(|e| QrError(e.to_string()))?;
        writer
            .write_image_data(&pixels)
            .map_err(|e| QrError(e.to_string()))?;
        writer.finish().map_err(|e| QrError(e.to_string()))?;
        Ok(out)
    }

    /// The code drawn with Unicode half blocks, two module rows per text line, for terminals.
    ///
    /// Light modules are drawn and dark ones left blank, because terminals are usually light
    /// text on a dark background: the blank cells show the background as the dark modules.
    /// (The same convention as `qrcode-terminal`, which phone scanners read fine.)
    pub fn to_text(&self) -> String {
        let side = self.side_with_margin();
        let mut out = String::with_capacity((side + 1) * side.div_ceil(2) * 3);
        for y in (0..side).step_by(2) {
            for x in 0..side {
                let top_light = !self.is_dark_with_margin(x, y);
                // Past the last row counts as dark: blank, so nothing is drawn below the code.
                let bottom_light = y + 1 < side && !self.is_dark_with_margin(x, y + 1);
                out.push(match (top_light, bottom_light) {
                    (true, true) => '█',
                    (true, false) => '▀',
                    (false, true) => '▄',
                    (false, false) => ' ',
                });
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "2@abcdefghijklmnopqrstuvwxyz0123456789ABCDEF,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB=,CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC=";

    fn decode_png(bytes: &[u8]) -> (u32, Vec<u8>, png::BitDepth) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.width, info.height);
        buf.truncate(info.buffer_size());
        (info.width, buf, info.bit_depth)
    }

    #[test]
    fn png_pixels_match_the_modules() {
        let m = QrMatrix::encode(SAMPLE).unwrap();
        let png = m.to_png(PNG_SCALE).unwrap();
        let (side, pixels, depth) = decode_png(&png);
        assert_eq!(depth, png::BitDepth::One);
        let side = side as usize;
        assert_eq!(side, (m.width() + 2 * QUIET_ZONE) * PNG_SCALE);
        let row_bytes = side.div_ceil(8);
        let white = |x: usize, y: usize| pixels[y * row_bytes + x / 8] & (0x80 >> (x % 8)) != 0;
        // Every pixel at the centre of each module agrees with the matrix; the margin is white.
        for my in 0..m.width() + 2 * QUIET_ZONE {
            for mx in 0..m.width() + 2 * QUIET_ZONE {
                let (px, py) = (
                    mx * PNG_SCALE + PNG_SCALE / 2,
                    my * PNG_SCALE + PNG_SCALE / 2,
                );
                assert_eq!(
                    white(px, py),
                    !m.is_dark_with_margin(mx, my),
                    "module ({mx},{my})"
                );
            }
        }
        // The finder pattern's top-left module is dark, the quiet zone before it is light.
        assert!(m.is_dark_with_margin(QUIET_ZONE, QUIET_ZONE));
        assert!(!m.is_dark_with_margin(QUIET_ZONE - 1, QUIET_ZONE));
        assert!(png.len() < 16 * 1024, "PNG is {} bytes", png.len());
    }

    /// Reads a QR code back from a grayscale bitmap, as a phone's camera would.
    pub(crate) fn scan(
        width: usize,
        height: usize,
        light: impl Fn(usize, usize) -> bool,
    ) -> String {
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| {
            if light(x, y) { 255 } else { 0 }
        });
        let grids = img.detect_grids();
        assert_eq!(grids.len(), 1, "expected one QR code");
        grids[0].decode().expect("decodes").1
    }

    #[test]
    fn png_scans_back_to_the_text() {
        let m = QrMatrix::encode(SAMPLE).unwrap();
        let (side, pixels, _) = decode_png(&m.to_png(PNG_SCALE).unwrap());
        let side = side as usize;
        let row_bytes = side.div_ceil(8);
        let text = scan(side, side, |x, y| {
            pixels[y * row_bytes + x / 8] & (0x80 >> (x % 8)) != 0
        });
        assert_eq!(text, SAMPLE);
    }

    #[test]
    fn terminal_text_scans_back_to_the_text() {
        let m = QrMatrix::encode(SAMPLE).unwrap();
        let lines: Vec<Vec<char>> = m.to_text().lines().map(|l| l.chars().collect()).collect();
        // Paint each character cell as two 4x4-pixel halves, light where drawn.
        let (w, h) = (lines[0].len() * 4, lines.len() * 8);
        let text = scan(w, h, |x, y| {
            let c = lines[y / 8][x / 4];
            let top = y % 8 < 4;
            match c {
                '█' => true,
                '▀' => top,
                '▄' => !top,
                _ => false,
            }
        });
        assert_eq!(text, SAMPLE);
    }

    #[test]
    fn text_has_two_module_rows_per_line() {
        let m = QrMatrix::encode("hello").unwrap();
        let text = m.to_text();
        let side = m.width() + 2 * QUIET_ZONE;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), side.div_ceil(2));
        assert!(lines.iter().all(|l| l.chars().count() == side));
        // The first line is the quiet zone: all light.
        assert!(lines[0].chars().all(|c| c == '█'), "{}", lines[0]);
        // Rebuild the matrix from the drawing and compare.
        for (ly, line) in lines.iter().enumerate() {
            for (x, c) in line.chars().enumerate() {
                let (top_light, bottom_light) = match c {
                    '█' => (true, true),
                    '▀' => (true, false),
                    '▄' => (false, true),
                    ' ' => (false, false),
                    other => panic!("unexpected {other:?}"),
                };
                assert_eq!(top_light, !m.is_dark_with_margin(x, 2 * ly));
                if 2 * ly + 1 < side {
                    assert_eq!(bottom_light, !m.is_dark_with_margin(x, 2 * ly + 1));
                }
            }
        }
    }

    #[test]
    fn oversized_text_is_an_error_not_a_panic() {
        let huge = "x".repeat(5000);
        assert!(QrMatrix::encode(&huge).is_err());
    }
}
