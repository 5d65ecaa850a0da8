//! A ray caster for the city: every image column casts one ray over the map of 1 m cells and
//! collects the building faces it enters, front to back; every row then finds what it sees
//! along that ray (the ground, a face, or the sky) from its elevation. The projection is
//! cylindrical, as in a 360-degree panorama: column x of a view of width W centred on bearing c
//! looks at bearing `c + (x + 0.5 - W/2) * 360 / turn`, where `turn` is the width of the full
//! panorama, and row y at elevation `atan((horizon - y - 0.5) * 2 pi / turn)`. So a crop of a
//! panorama and a view rendered with the same `turn` at the crop's bearing are the same image.

use super::city::{Building, City, Ground, GroundFloor, Windows, SIDEWALK, STREET_WIDTH};
use crate::io::image::Rgb8;
use std::f64::consts::PI;

/// Where a camera stands and what part of the panorama around it an image shows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    /// Local metres (east, north) on the city map.
    pub position: [f64; 2],
    pub camera_height: f64,
    /// Compass bearing of the centre of the image, degrees clockwise from north.
    pub bearing: f64,
    pub width: usize,
    pub height: usize,
    /// Pixels in a full turn: the width of the panorama the view is a window of.
    pub turn: usize,
    /// The horizon's row, counted from the top edge of the image (in pixels).
    pub horizon: f64,
}

/// The weather and light of one capture.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Appearance {
    /// Sun azimuth (degrees, clockwise from north) and elevation (degrees).
    pub sun_azimuth: f64,
    pub sun_elevation: f64,
    /// Strength of direct sunlight and of the sky's diffuse light.
    pub sun: f32,
    pub ambient: f32,
    /// Overall exposure and per-channel tint.
    pub exposure: f32,
    pub tint: [f32; 3],
    pub saturation: f32,
    pub contrast: f32,
    pub sky_horizon: [f32; 3],
    pub sky_zenith: [f32; 3],
    /// Cloud cover in [0, 1], their colour, and where the cloud pattern is.
    pub clouds: f32,
    pub cloud_colour: [f32; 3],
    pub cloud_shift: f64,
    /// Metres at which the haze takes away 63% of the contrast.
    pub visibility: f64,
    /// Fraction of windows lit from inside, and that light's colour.
    pub lit_windows: f32,
    pub lamp: [f32; 3],
    /// Amplitude of the per-pixel sensor noise (in 8-bit levels).
    pub noise: f32,
}

/// A building face a ray enters.
#[derive(Clone, Copy)]
struct Hit {
    distance: f64,
    building: u16,
    /// Metres along the face from its building's corner.
    u: f64,
    /// Length of the face.
    span: f64,
    /// Light falling on the face (its normal against the sun).
    light: f32,
    haze: f32,
}

/// How far rays go (metres): past the ends of any city's streets.
const MAX_DISTANCE: f64 = 700.0;

/// Renders `view` of `city` under `appearance`; `noise_seed` seeds the sensor noise.
pub fn render(city: &City, view: &View, appearance: &Appearance, noise_seed: u64) -> Rgb8 {
    let (w, h) = (view.width, view.height);
    let mut pixels = vec![0u8; w * h * 3];
    let step = 2.0 * PI / view.turn as f64;
    // elevation tangent of each row
    let tangents: Vec<f64> = (0..h)
        .map(|y| ((view.horizon - y as f64 - 0.5) * step).tan())
        .collect();
    let top = tangents.first().copied().unwrap_or(0.0);
    let sun_dir = [
        appearance.sun_azimuth.to_radians().sin(),
        appearance.sun_azimuth.to_radians().cos(),
    ];
    let sun_height = appearance.sun_elevation.to_radians();
    let ground_light = appearance.ambient + appearance.sun * sun_height.sin().max(0.0) as f32;
    let light = Light {
        sun_dir,
        direct: appearance.sun * sun_height.cos().max(0.0) as f32,
        ambient: appearance.ambient,
    };
    let mut hits = Vec::new();
    let mut noise = Noise(noise_seed ^ 0x05EE_D0FA_015E);
    for x in 0..w {
        let bearing = view.bearing.to_radians() + (x as f64 + 0.5 - w as f64 / 2.0) * step;
        let dir = [bearing.sin(), bearing.cos()];
        cast(city, view, dir, top, &light, appearance, &mut hits);
        for (y, &t) in tangents.iter().enumerate() {
            let ground_distance = if t < 0.0 {
                view.camera_height / -t
            } else {
                f64::INFINITY
            };
            let mut colour = None;
            for hit in &hits {
                if ground_distance < hit.distance {
                    break;
                }
                let z = view.camera_height + t * hit.distance;
                let b = &city.buildings[hit.building as usize - 1];
                if z <= b.height {
                    let c = facade(b, hit, z, appearance);
                    colour = Some(mix(c, appearance.sky_horizon, hit.haze));
                    break;
                }
            }
            let colour = colour.unwrap_or_else(|| {
                if ground_distance.is_finite() {
                    let p = [
                        view.position[0] + dir[0] * ground_distance,
                        view.position[1] + dir[1] * ground_distance,
                    ];
                    let c = ground(city, p, ground_light);
                    mix(c, appearance.sky_horizon, haze(ground_distance, appearance))
                } else {
                    sky(bearing, t, appearance, sun_dir, sun_height)
                }
            });
            let graded = grade(colour, appearance);
            let i = (y * w + x) * 3;
            for c in 0..3 {
                let v = graded[c] * 255.0 + appearance.noise * noise.symmetric();
                pixels[i + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Rgb8 {
        height: h,
        width: w,
        pixels,
    }
}

/// Sunlight on vertical faces: the sun's horizontal direction, the strength of its light on a
/// face turned to it, and the light every face gets.
struct Light {
    sun_dir: [f64; 2],
    direct: f32,
    ambient: f32,
}

/// Walks the map cells along `dir` (Amanatides-Woo) and collects the faces entered, up to the
/// first that hides everything above it in the image (`top`: the top row's elevation tangent).
fn cast(
    city: &City,
    view: &View,
    dir: [f64; 2],
    top: f64,
    light: &Light,
    appearance: &Appearance,
    hits: &mut Vec<Hit>,
) {
    hits.clear();
    let [px, py] = view.position;
    let (mut cx, mut cy) = (px.floor() as i64, py.floor() as i64);
    let step_x: i64 = if dir[0] > 0.0 { 1 } else { -1 };
    let step_y: i64 = if dir[1] > 0.0 { 1 } else { -1 };
    let boundary = |p: f64, c: i64, d: f64| {
        if d > 0.0 {
            (c as f64 + 1.0 - p) / d
        } else if d < 0.0 {
            (p - c as f64) / -d
        } else {
            f64::INFINITY
        }
    };
    let mut next_x = boundary(px, cx, dir[0]);
    let mut next_y = boundary(py, cy, dir[1]);
    let delta_x = 1.0 / dir[0].abs();
    let delta_y = 1.0 / dir[1].abs();
    let mut current = city.cell(cx, cy);
    loop {
        let (distance, across_x) = if next_x < next_y {
            cx += step_x;
            let d = next_x;
            next_x += delta_x;
            (d, true)
        } else {
            cy += step_y;
            let d = next_y;
            next_y += delta_y;
            (d, false)
        };
        if distance > MAX_DISTANCE
            || cx < -1
            || cy < -1
            || cx > city.width as i64
            || cy > city.height as i64
        {
            return;
        }
        let id = city.cell(cx, cy);
        if id != 0 && id != current {
            let b: &Building = &city.buildings[id as usize - 1];
            // the face's outward normal points back against the step
            let (normal, u, span) = if across_x {
                (
                    [-step_x as f64, 0.0],
                    py + dir[1] * distance - b.min[1],
                    b.max[1] - b.min[1],
                )
            } else {
                (
                    [0.0, -step_y as f64],
                    px + dir[0] * distance - b.min[0],
                    b.max[0] - b.min[0],
                )
            };
            let facing =
                (normal[0] * light.sun_dir[0] + normal[1] * light.sun_dir[1]).max(0.0) as f32;
            hits.push(Hit {
                distance,
                building: id,
                u,
                span,
                light: light.ambient + light.direct * facing,
                haze: haze(distance, appearance),
            });
            if view.camera_height + top * distance <= b.height {
                return;
            }
        }
        current = id;
    }
}

fn haze(distance: f64, appearance: &Appearance) -> f32 {
    1.0 - (-distance / appearance.visibility).exp() as f32
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn scale(a: [f32; 3], s: f32) -> [f32; 3] {
    a.map(|c| c * s)
}

/// The colour of a point of a face, lit.
fn facade(b: &Building, hit: &Hit, z: f64, appearance: &Appearance) -> [f32; 3] {
    let s = &b.style;
    let u = hit.u;
    let grain = 1.0 + s.grain * (2.0 * value_noise(u * 5.0, z * 5.0, hit.building as u64) - 1.0);
    let wall = scale(s.wall, grain);
    // ambient occlusion where walls meet the street
    let occlusion = 0.8 + 0.2 * (z / 2.5).min(1.0) as f32;
    let light = hit.light * occlusion;
    let lit = |c: [f32; 3]| scale(c, light);
    let glass = |window: u64| {
        let h = hash(hit.building as u64, window, 0x6A55);
        if (h as f32 / u64::MAX as f32) < appearance.lit_windows {
            let warm = 0.75 + 0.25 * unit(hash(window, hit.building as u64, 7));
            return scale(appearance.lamp, warm);
        }
        let reflection = mix(s.glass, appearance.sky_horizon, 0.3);
        lit(scale(reflection, 0.8 + 0.4 * unit(h)))
    };
    if s.cornice > 0.0 && z > b.height - s.cornice {
        return lit(s.trim);
    }
    // corner piers
    if u < 0.35 || u > hit.span - 0.35 {
        return lit(scale(s.trim, 0.9));
    }
    if z < s.ground_height {
        return match s.ground {
            GroundFloor::Shops { sign } => {
                let sign_low = s.ground_height - 1.0;
                if z > sign_low && z < s.ground_height - 0.2 {
                    lit(sign)
                } else if z > 0.3 && z < sign_low - 0.15 {
                    let shop = 3.0 + (hit.building % 4) as f64;
                    let f = (u / shop).fract();
                    if f > 0.08 && f < 0.92 {
                        glass((u / shop) as u64 + 1000)
                    } else {
                        lit(s.trim)
                    }
                } else {
                    lit(wall)
                }
            }
            GroundFloor::Doors { pitch } => {
                let f = (u / pitch).fract() * pitch;
                if f > 1.0 && f < 2.2 && z < 2.4 {
                    lit(scale(s.trim, 0.45))
                } else if (f > 2.8 && f < pitch - 0.6) && z > 1.0 && z < s.ground_height - 0.7 {
                    glass((u / pitch) as u64 + 2000)
                } else {
                    lit(wall)
                }
            }
        };
    }
    let above = z - s.ground_height;
    let floor = (above / s.floor_height) as u64;
    let fz = (above / s.floor_height).fract();
    let bay = (u / s.bay) as u64;
    let fu = (u / s.bay).fract();
    if s.band_every > 0 && floor % s.band_every as u64 == 0 && fz < 0.35 {
        return lit(s.band);
    }
    let sill = 0.5 - s.window_height / 2.0;
    let in_height = fz > sill && fz < sill + s.window_height;
    let half = s.window_width / 2.0;
    let window = floor * 4096 + bay;
    let frame = 0.04;
    let (inside, near) = match s.windows {
        Windows::Punched => (
            in_height && (fu - 0.5).abs() < half,
            fz > sill - frame
                && fz < sill + s.window_height + frame
                && (fu - 0.5).abs() < half + frame,
        ),
        Windows::Paired => {
            let g = (fu * 2.0).fract();
            (
                in_height && (g - 0.5).abs() < half * 0.8,
                fz > sill - frame
                    && fz < sill + s.window_height + frame
                    && (g - 0.5).abs() < half * 0.8 + frame,
            )
        }
        Windows::Ribbon => (
            in_height,
            fz > sill - frame && fz < sill + s.window_height + frame,
        ),
        Windows::Strips => (
            (fu - 0.5).abs() < half && fz > 0.08,
            (fu - 0.5).abs() < half + frame,
        ),
        Windows::Curtain => (fu > 0.06 && fz > 0.06, true),
    };
    if inside {
        glass(window)
    } else if near {
        lit(s.trim)
    } else {
        lit(wall)
    }
}

/// The ground at local point `p`: roadway with a dashed centre line and curbs, crossings,
/// paving slabs.
fn ground(city: &City, p: [f64; 2], light: f32) -> [f32; 3] {
    let grain = value_noise(p[0] * 3.0, p[1] * 3.0, 11);
    let asphalt = scale([0.27, 0.27, 0.29], 0.85 + 0.3 * grain);
    let base = match city.ground(p[0], p[1]) {
        Ground::Road { across, along } => {
            let curb = STREET_WIDTH as f64 / 2.0 - SIDEWALK - 0.25;
            if across < 0.12 && along.rem_euclid(6.0) < 3.0 {
                [0.85, 0.8, 0.55]
            } else if across > curb {
                [0.55, 0.55, 0.53]
            } else {
                asphalt
            }
        }
        Ground::Crossing => asphalt,
        Ground::Paving => {
            let joint = p[0].rem_euclid(1.5) < 0.06 || p[1].rem_euclid(1.5) < 0.06;
            let c = if joint { 0.45 } else { 0.62 + 0.1 * grain };
            [c, c * 0.98, c * 0.95]
        }
    };
    scale(base, light)
}

/// The sky: a gradient from the horizon to the zenith, clouds, and a glow around the sun.
fn sky(bearing: f64, t: f64, a: &Appearance, sun_dir: [f64; 2], sun_height: f64) -> [f32; 3] {
    let elevation = t.atan();
    let up = (elevation / (PI / 2.0)).clamp(0.0, 1.0).powf(0.6) as f32;
    let mut c = mix(a.sky_horizon, a.sky_zenith, up);
    // clouds on a plane above the city, seen in perspective
    if a.clouds > 0.0 && t > 0.01 {
        let reach = 1.0 / t;
        let (x, y) = (bearing.sin() * reach, bearing.cos() * reach);
        let n = value_noise(x * 1.5 + a.cloud_shift, y * 1.5, 3) * 0.65
            + value_noise(x * 4.0, y * 4.0 + a.cloud_shift, 4) * 0.35;
        let cover = ((n - (1.0 - a.clouds)) * 3.0).clamp(0.0, 1.0);
        c = mix(c, a.cloud_colour, cover * (1.0 - 0.5 * (1.0 - up)));
    }
    let cos_angle = sun_height.cos()
        * elevation.cos()
        * (bearing.sin() * sun_dir[0] + bearing.cos() * sun_dir[1])
        + sun_height.sin() * elevation.sin();
    let glow = (cos_angle.max(0.0).powi(16) * a.sun as f64 * 0.5) as f32;
    c.map(|v| v + glow)
}

/// Exposure, tint, saturation and contrast of the capture.
fn grade(c: [f32; 3], a: &Appearance) -> [f32; 3] {
    let exposed = [
        c[0] * a.exposure * a.tint[0],
        c[1] * a.exposure * a.tint[1],
        c[2] * a.exposure * a.tint[2],
    ];
    let luma = 0.299 * exposed[0] + 0.587 * exposed[1] + 0.114 * exposed[2];
    exposed.map(|v| ((luma + (v - luma) * a.saturation) - 0.5) * a.contrast + 0.5)
}

/// Sensor noise: a counter-based stream, so every image's noise depends on its seed only.
struct Noise(u64);

impl Noise {
    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        2.0 * unit(mix64(self.0)) - 1.0
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash(a: u64, b: u64, c: u64) -> u64 {
    mix64(a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix64(b ^ mix64(c)))
}

/// A hash as a number in [0, 1).
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise in [0, 1): hashed values on an integer lattice, interpolated.
fn value_noise(x: f64, y: f64, salt: u64) -> f32 {
    let (fx, fy) = (x.floor(), y.floor());
    let (ix, iy) = (fx as i64 as u64, fy as i64 as u64);
    let smooth = |t: f64| (t * t * (3.0 - 2.0 * t)) as f32;
    let (sx, sy) = (smooth(x - fx), smooth(y - fy));
    let at = |dx: u64, dy: u64| unit(hash(ix.wrapping_add(dx), iy.wrapping_add(dy), salt));
    let bottom = at(0, 0) + (at(1, 0) - at(0, 0)) * sx;
    let top = at(0, 1) + (at(1, 1) - at(0, 1)) * sx;
    bottom + (top - bottom) * sy
}
