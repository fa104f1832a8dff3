//! Figures: the paper's Figure 1 and a generic line chart, each written as SVG and PNG.
//!
//! Every figure is drawn twice by the same code: once into an SVG string, once into an RGB
//! buffer at twice the final size that is then averaged down 2x2. plotters draws bitmap lines
//! without anti-aliasing; the supersampling gives the PNG smooth lines at no cost in code.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{display_name, fmt_steps, png, write_atomic, MnistReport, BN_NAME, PLAIN_NAME};
use crate::{Error, Result};

/// DejaVu Sans, vendored so that figures look the same on every machine (see assets/README.md).
static FONT_BYTES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/DejaVuSans.ttf"
));

/// Supersampling factor for the PNG.
const SS: u32 = 2;

const ORANGE: RGBColor = RGBColor(230, 97, 1);
const ORANGE_LIGHT: RGBColor = RGBColor(245, 160, 80);
const BLUE: RGBColor = RGBColor(33, 102, 172);
const BLUE_LIGHT: RGBColor = RGBColor(110, 165, 215);
/// Colours for series beyond the two nets of Figure 1 (a colour-blind safe qualitative set).
const PALETTE: [RGBColor; 8] = [
    BLUE,
    ORANGE,
    RGBColor(27, 158, 119),
    RGBColor(117, 112, 179),
    RGBColor(231, 41, 138),
    RGBColor(102, 166, 30),
    RGBColor(166, 118, 29),
    RGBColor(80, 80, 80),
];

/// plotters' `ab_glyph` text renderer knows no fonts until one is registered; registration is
/// global, so it happens once per process.
fn ensure_font(path: &Path) -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Report {
            path: path.to_path_buf(),
            msg: "the embedded DejaVu Sans font could not be loaded".into(),
        })
    }
}

/// One line of a panel.
struct Series {
    label: String,
    color: RGBColor,
    /// Stroke width in pixels of the final image.
    width: f64,
    points: Vec<(f64, f64)>,
}

/// A filled region between two curves sampled at the same x values.
struct Band {
    color: RGBColor,
    lower: Vec<(f64, f64)>,
    upper: Vec<(f64, f64)>,
}

/// One chart: axes, lines, optional bands, legend.
struct Panel {
    title: String,
    x_label: String,
    y_label: String,
    x_range: (f64, f64),
    y_range: (f64, f64),
    series: Vec<Series>,
    bands: Vec<Band>,
    legend: SeriesLabelPosition,
}

/// A whole figure: panels side by side.
struct Figure {
    /// Size in pixels of the final image (SVG and PNG).
    size: (u32, u32),
    panels: Vec<Panel>,
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

impl Figure {
    /// Draws at scale `s`: every length (fonts, strokes, margins) is multiplied by it.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, s: f64) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let areas = root.split_evenly((1, self.panels.len().max(1)));
        for (panel, area) in self.panels.iter().zip(&areas) {
            panel.draw(area, s)?;
        }
        Ok(())
    }

    /// Writes `<path>.svg` and `<path>.png`.
    fn write(&self, path_without_ext: &Path) -> Result<()> {
        let svg_path = with_ext(path_without_ext, "svg");
        let png_path = with_ext(path_without_ext, "png");
        ensure_font(&svg_path)?;

        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, self.size).into_drawing_area();
            self.draw(&root, 1.0)
                .map_err(|e| report_err(&svg_path, e))?;
            root.present().map_err(|e| report_err(&svg_path, e))?;
        }
        write_atomic(&svg_path, svg.as_bytes())?;

        let (w, h) = (self.size.0 * SS, self.size.1 * SS);
        let mut big = vec![0u8; 3 * w as usize * h as usize];
        {
            let root = BitMapBackend::with_buffer(&mut big, (w, h)).into_drawing_area();
            self.draw(&root, SS as f64)
                .map_err(|e| report_err(&png_path, e))?;
            root.present().map_err(|e| report_err(&png_path, e))?;
        }
        let small = downsample(&big, w as usize, h as usize, SS as usize);
        let bytes =
            png::encode_rgb(self.size.0, self.size.1, &small).map_err(|e| Error::Report {
                path: png_path.clone(),
                msg: format!("PNG encoding failed: {e}"),
            })?;
        write_atomic(&png_path, &bytes)
    }
}

impl Panel {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, s: f64) -> DrawResult<DB> {
        let px = |v: f64| (v * s).round() as u32;
        let font = |size: f64| ("sans-serif", size * s).into_font();
        let (x0, x1) = self.x_range;
        let (y0, y1) = self.y_range;
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, font(19.0))
            .margin_top(px(8.0))
            .margin_left(px(8.0))
            .margin_right(px(18.0))
            .margin_bottom(px(6.0))
            .x_label_area_size(px(46.0))
            .y_label_area_size(px(64.0))
            .build_cartesian_2d(x0..x1, y0..y1)?;

        let y_decimals = decimals_for(y1 - y0);
        let x_fmt = |v: &f64| fmt_steps(*v);
        let y_fmt = move |v: &f64| format!("{v:.y_decimals$}");
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_labels(7)
            .y_labels(7)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style(font(13.0))
            .axis_desc_style(font(14.0))
            .set_all_tick_mark_size(px(4.0))
            .bold_line_style(BLACK.mix(0.10).stroke_width(px(1.0).max(1)))
            .max_light_lines(1)
            .light_line_style(BLACK.mix(0.04).stroke_width(px(1.0).max(1)))
            .axis_style(BLACK.mix(0.55).stroke_width(px(1.0).max(1)))
            .draw()?;

        for band in &self.bands {
            let mut outline: Vec<(f64, f64)> = band.upper.clone();
            outline.extend(band.lower.iter().rev().copied());
            if outline.len() >= 3 {
                chart.draw_series(std::iter::once(Polygon::new(
                    outline,
                    band.color.mix(0.14).filled(),
                )))?;
            }
        }

        for series in &self.series {
            let style = series
                .color
                .stroke_width(((series.width * s).round() as u32).max(1));
            let swatch = px(24.0) as i32;
            chart
                .draw_series(LineSeries::new(series.points.iter().copied(), style))?
                .label(series.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + swatch, y)], style));
        }

        if self.series.iter().any(|sr| !sr.label.is_empty()) {
            chart
                .configure_series_labels()
                .position(self.legend.clone())
                .margin(px(10.0))
                .legend_area_size(px(30.0))
                .label_font(font(13.0))
                .background_style(WHITE.mix(0.92))
                .border_style(BLACK.mix(0.25))
                .draw()?;
        }
        Ok(())
    }
}

/// Figure 1(a)'s accuracy axis: it covers every evaluation (step 0's near-chance accuracy
/// included), so no point is drawn on an edge it does not lie on; the lower end is the lowest
/// accuracy rounded down to 0.05, the upper end 1.
fn accuracy_axis(report: &MnistReport) -> (f64, f64) {
    let all_min = report
        .variants
        .iter()
        .flat_map(|v| v.curve.iter())
        .map(|p| p.test_accuracy)
        .filter(|a| a.is_finite())
        .fold(f64::INFINITY, f64::min);
    let lo = if all_min.is_finite() {
        ((all_min * 20.0).floor() / 20.0).clamp(0.0, 0.9)
    } else {
        0.9
    };
    (lo, 1.0)
}

/// Writes the paper's Figure 1 as `<path>.svg` and `<path>.png`: (a) test accuracy of all nets,
/// (b)/(c) the 15/50/85th percentiles of one last-layer sigmoid input without and with BN.
pub(super) fn write_fig1(path_without_ext: &Path, report: &MnistReport) -> Result<()> {
    let x_max = report
        .variants
        .iter()
        .filter_map(|v| v.curve.last())
        .map(|p| p.step as f64)
        .fold(0.0, f64::max);
    let x_range = (0.0, if x_max > 0.0 { x_max } else { 1.0 });

    let acc_range = accuracy_axis(report);
    let accuracy_series: Vec<Series> = report
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| Series {
            label: display_name(&v.name).to_string(),
            color: variant_color(&v.name, i),
            width: 2.2,
            points: v
                .curve
                .iter()
                .filter(|p| p.test_accuracy.is_finite())
                .map(|p| {
                    (
                        p.step as f64,
                        p.test_accuracy.clamp(acc_range.0, acc_range.1),
                    )
                })
                .collect(),
        })
        .collect();
    let panel_a = Panel {
        title: "(a) Test accuracy".into(),
        x_label: "steps".into(),
        y_label: "test accuracy".into(),
        x_range,
        y_range: acc_range,
        series: accuracy_series,
        bands: Vec::new(),
        legend: SeriesLabelPosition::LowerRight,
    };

    // (b) and (c) share one y-range so that the spread of the two nets can be compared by eye.
    let plain = report.variants.iter().find(|v| v.name == PLAIN_NAME);
    let bn = report.variants.iter().find(|v| v.name == BN_NAME);
    let values: Vec<f64> = [plain, bn]
        .into_iter()
        .flatten()
        .flat_map(|v| v.curve.iter())
        .flat_map(|p| [p.p15, p.p50, p.p85])
        .filter(|x| x.is_finite())
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (-1.0, 1.0)
    };
    // Headroom above the data keeps the legend (top right) off the lines.
    let span = hi - lo;
    let pct_range = (lo - 0.05 * span, hi + 0.45 * span);
    let percentile_panel = |title: &str, run: Option<&super::VariantRun>, dark, light| {
        let pick = |f: fn(&super::CurvePoint) -> f64| -> Vec<(f64, f64)> {
            run.map(|v| {
                v.curve
                    .iter()
                    .filter(|p| p.p15.is_finite() && p.p50.is_finite() && p.p85.is_finite())
                    .map(|p| (p.step as f64, f(p)))
                    .collect()
            })
            .unwrap_or_default()
        };
        let (p15, p50, p85) = (pick(|p| p.p15), pick(|p| p.p50), pick(|p| p.p85));
        Panel {
            title: title.into(),
            x_label: "steps".into(),
            y_label: "sigmoid input".into(),
            x_range,
            y_range: pct_range,
            bands: vec![Band {
                color: dark,
                lower: p15.clone(),
                upper: p85.clone(),
            }],
            series: vec![
                Series {
                    label: "85th percentile".into(),
                    color: light,
                    width: 1.4,
                    points: p85,
                },
                Series {
                    label: "50th percentile".into(),
                    color: dark,
                    width: 2.6,
                    points: p50,
                },
                Series {
                    label: "15th percentile".into(),
                    color: light,
                    width: 1.4,
                    points: p15,
                },
            ],
            legend: SeriesLabelPosition::UpperRight,
        }
    };
    let figure = Figure {
        size: (1500, 450),
        panels: vec![
            panel_a,
            percentile_panel("(b) Without BN", plain, ORANGE, ORANGE_LIGHT),
            percentile_panel("(c) With BN", bn, BLUE, BLUE_LIGHT),
        ],
    };
    figure.write(path_without_ext)
}

/// Writes a generic line chart (for example test accuracy against training steps) as
/// `<path>.svg` and `<path>.png`, 900x560 pixels.
///
/// `series` holds (legend label, points); non-finite points are skipped. Without `y_range`
/// the range is fitted to the data with a small margin. The x axis starts at 0 (or at the
/// smallest x if that is negative) and its labels are formatted as step counts (10k).
pub fn line_chart(
    path_without_ext: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let panel = chart_panel(
        path_without_ext,
        &Chart {
            title,
            x_label,
            y_label,
            series,
            y_range,
        },
    )?;
    Figure {
        size: (900, 560),
        panels: vec![panel],
    }
    .write(path_without_ext)
}

/// One panel of [`line_charts`]: the arguments of [`line_chart`].
pub struct Chart<'a> {
    /// The panel's title.
    pub title: &'a str,
    /// The x axis's label.
    pub x_label: &'a str,
    /// The y axis's label.
    pub y_label: &'a str,
    /// (legend label, points) per line.
    pub series: &'a [(String, Vec<(f64, f64)>)],
    /// The y range; `None`: fitted to the data.
    pub y_range: Option<(f64, f64)>,
}

/// Line charts side by side (each as [`line_chart`], 750x560 pixels a panel) in one figure,
/// `<path>.svg` and `<path>.png`.
pub fn line_charts(path_without_ext: &Path, charts: &[Chart<'_>]) -> Result<()> {
    let panels = charts
        .iter()
        .map(|c| chart_panel(path_without_ext, c))
        .collect::<Result<Vec<_>>>()?;
    Figure {
        size: (750 * panels.len().max(1) as u32, 560),
        panels,
    }
    .write(path_without_ext)
}

fn chart_panel(path_without_ext: &Path, chart: &Chart<'_>) -> Result<Panel> {
    let Chart {
        title,
        x_label,
        y_label,
        series,
        y_range,
    } = *chart;
    let bad = |msg: String| Error::Report {
        path: with_ext(path_without_ext, "svg"),
        msg,
    };
    let points = || {
        series
            .iter()
            .flat_map(|(_, p)| p.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let x_min = points().map(|p| p.0).fold(0.0, f64::min);
    let x_max = points().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let x_range = if x_max > x_min {
        (x_min, x_max)
    } else {
        (x_min, x_min + 1.0)
    };
    let y_range = match y_range {
        Some((a, b)) if a.is_finite() && b.is_finite() && a < b => (a, b),
        Some((a, b)) => return Err(bad(format!("y range {a}..{b} is empty or not finite"))),
        None => {
            let lo = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
            let hi = points().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() {
                (0.0, 1.0)
            } else if hi > lo {
                (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
            } else {
                (lo - 0.5, lo + 0.5)
            }
        }
    };
    let (y0, y1) = y_range;
    Ok(Panel {
        title: title.into(),
        x_label: x_label.into(),
        y_label: y_label.into(),
        x_range,
        y_range,
        series: series
            .iter()
            .enumerate()
            .map(|(i, (label, pts))| Series {
                label: label.clone(),
                color: PALETTE[i % PALETTE.len()],
                width: 2.2,
                points: pts
                    .iter()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    // Points outside a caller's range are drawn on its edge rather than past the axes.
                    .map(|&(x, y)| (x, y.clamp(y0, y1)))
                    .collect(),
            })
            .collect(),
        bands: Vec::new(),
        legend: SeriesLabelPosition::LowerRight,
    })
}

/// One panel of [`panels_figure`]: lines (legend label, points), and optionally the band
/// between the first and the last line in the middle line's colour (percentiles). Colours come
/// from the palette by `colors` (one index per line; the line's own index without it).
pub struct PanelSpec {
    /// Caption.
    pub title: String,
    /// The x axis's name (its labels are step counts).
    pub x_label: String,
    /// The y axis's name.
    pub y_label: String,
    /// (legend label, points); non-finite points are skipped.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    /// Palette index per line.
    pub colors: Option<Vec<usize>>,
    /// Fill between the first and the last line (three percentile lines).
    pub band: bool,
    /// The y range; fitted to the data with a small margin when `None`.
    pub y_range: Option<(f64, f64)>,
}

/// Writes panels side by side as `<path>.svg` and `<path>.png`, `width` pixels per panel.
pub fn panels_figure(path_without_ext: &Path, panels: &[PanelSpec], width: u32) -> Result<()> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let built = panels
        .iter()
        .map(|ps| {
            let pts = || ps.series.iter().flat_map(|(_, p)| p.iter()).filter(finite);
            let x_min = pts().map(|p| p.0).fold(0.0, f64::min);
            let x_max = pts().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
            let x_range = if x_max > x_min {
                (x_min, x_max)
            } else {
                (x_min, x_min + 1.0)
            };
            let y_range = ps.y_range.unwrap_or_else(|| {
                let lo = pts().map(|p| p.1).fold(f64::INFINITY, f64::min);
                let hi = pts().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
                if !lo.is_finite() {
                    (0.0, 1.0)
                } else if hi > lo {
                    (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
                } else {
                    (lo - 0.5, lo + 0.5)
                }
            });
            let (y0, y1) = y_range;
            let color = |i: usize| {
                let k = ps
                    .colors
                    .as_ref()
                    .and_then(|c| c.get(i).copied())
                    .unwrap_or(i);
                PALETTE[k % PALETTE.len()]
            };
            let clean = |p: &[(f64, f64)]| -> Vec<(f64, f64)> {
                p.iter()
                    .filter(finite)
                    .map(|&(x, y)| (x, y.clamp(y0, y1)))
                    .collect()
            };
            let n = ps.series.len();
            let bands = if ps.band && n >= 3 {
                vec![Band {
                    color: color(n / 2),
                    lower: clean(&ps.series[n - 1].1),
                    upper: clean(&ps.series[0].1),
                }]
            } else {
                Vec::new()
            };
            Panel {
                title: ps.title.clone(),
                x_label: ps.x_label.clone(),
                y_label: ps.y_label.clone(),
                x_range,
                y_range,
                series: ps
                    .series
                    .iter()
                    .enumerate()
                    .map(|(i, (label, p))| Series {
                        label: label.clone(),
                        color: color(i),
                        width: if ps.band && i != n / 2 { 1.2 } else { 2.2 },
                        points: clean(p),
                    })
                    .collect(),
                bands,
                legend: SeriesLabelPosition::UpperRight,
            }
        })
        .collect::<Vec<_>>();
    Figure {
        size: (width * built.len().max(1) as u32, 480),
        panels: built,
    }
    .write(path_without_ext)
}

fn variant_color(name: &str, index: usize) -> RGBColor {
    match name {
        PLAIN_NAME => ORANGE,
        BN_NAME => BLUE,
        _ => PALETTE[index % PALETTE.len()],
    }
}

/// Enough decimals on the y labels to tell ticks apart.
fn decimals_for(span: f64) -> usize {
    if span < 0.05 {
        3
    } else if span < 0.5 {
        2
    } else if span < 5.0 {
        1
    } else {
        0
    }
}

/// `fig1` + `svg` -> `fig1.svg`, keeping any dots already in the name.
fn with_ext(path_without_ext: &Path, ext: &str) -> PathBuf {
    let mut s = path_without_ext.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn report_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Report {
        path: path.to_path_buf(),
        msg: format!("drawing failed: {e}"),
    }
}

/// Averages `f`x`f` blocks of an RGB image of `w`x`h` pixels (both multiples of `f`).
fn downsample(rgb: &[u8], w: usize, h: usize, f: usize) -> Vec<u8> {
    let (sw, sh) = (w / f, h / f);
    let mut out = vec![0u8; 3 * sw * sh];
    let n = (f * f) as u32;
    for y in 0..sh {
        for x in 0..sw {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..f {
                    let row = (y * f + dy) * w;
                    for dx in 0..f {
                        sum += rgb[3 * (row + x * f + dx) + c] as u32;
                    }
                }
                out[3 * (y * sw + x) + c] = ((sum + n / 2) / n) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{CurvePoint, VariantRun};

    fn run(points: &[(usize, f64)]) -> VariantRun {
        VariantRun {
            name: "mlp-fig1".into(),
            curve: points
                .iter()
                .map(|&(step, test_accuracy)| CurvePoint {
                    step,
                    test_accuracy,
                    p15: 0.0,
                    p50: 0.0,
                    p85: 0.0,
                    train_loss: 0.0,
                })
                .collect(),
            final_running: 0.0,
            final_population: 0.0,
            train_seconds: 0.0,
        }
    }

    /// A short run's early accuracy (0.098 at step 0, 0.6 at 500) lies inside the axis rather
    /// than on a bottom edge at 0.80 (the bug of issue 14).
    #[test]
    fn accuracy_axis_covers_every_point() {
        let report = MnistReport {
            setup: serde_json::Value::Null,
            variants: vec![run(&[(0, 0.098), (500, 0.6), (5000, 0.95)])],
        };
        let (lo, hi) = accuracy_axis(&report);
        assert_eq!((lo, hi), (0.05, 1.0));
        for p in &report.variants[0].curve {
            assert!((lo..=hi).contains(&p.test_accuracy));
        }
        let late = MnistReport {
            setup: serde_json::Value::Null,
            variants: vec![run(&[(0, 0.93), (500, 0.97)])],
        };
        assert_eq!(accuracy_axis(&late), (0.9, 1.0));
    }
}
