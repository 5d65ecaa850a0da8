//! What the synthetic datasets hold: the camera positions along the streets, each capture's
//! weather and light, and the file every image goes to. Planning renders nothing, so the layout
//! and the class statistics of any `--places` are cheap to compute.
//!
//! Places are 10 m cells along a street (UTM-aligned, CosPlace's M): every other cell between
//! two intersections, 4 per segment. Training places lie in the west of the city, the test
//! district in the east, two blocks apart.
//! - train: every place is captured from 12 camera positions spread along it, each under a
//!   weather and light of its own; a capture is one panorama (`train_panoramas/`) heading along
//!   the street, and 12 square crops of it every 30 degrees (`train/`), so each place gives 12
//!   CosPlace classes (one per 30-degree heading bin) of 12 images.
//! - val: database views of every fourth training place (one camera position, 12 headings) under
//!   a fixed clear-day light, and queries anywhere in those places under other weather and
//!   light, at any heading, from a lower or higher camera slightly tilted: new camera positions
//!   in the trained city.
//! - test: the same on the test district's streets, which no training image shows.

use super::city::{City, Segment};
use super::names::{to_centimetres, ImageName};
use super::render::{Appearance, View};
use super::SynthOptions;
use crate::error::{Error, Result};
use crate::tensor::Rng;
use std::path::PathBuf;

/// CosPlace's cell side (metres): a place.
pub const PLACE: f64 = 10.0;
/// Places per street segment: every other 10 m cell between two intersections (the 90 m pitch
/// holds the intersection and 8 cells), so that a segment's places also fill 5 of EigenPlaces'
/// 15 m cells with at least 6 panoramas each.
const PLACES_PER_SEGMENT: usize = 4;
/// Camera positions (captures) per training place.
pub const CAPTURES_PER_PLACE: usize = 12;
/// Crops cut from every training panorama, 30 degrees apart.
pub const CROPS_PER_PANORAMA: usize = 12;
/// Height of a car-mounted camera (metres).
const CAMERA_HEIGHT: f64 = 2.5;
/// The horizon's row as a fraction of the image height: the camera looks a little up, so that
/// more of the facades than of the road is in the picture.
const HORIZON: f64 = 0.62;

/// One rendered view and the image files cut from it.
#[derive(Clone, Debug)]
pub struct Capture {
    pub view: View,
    pub appearance: Appearance,
    pub noise_seed: u64,
    pub images: Vec<PlannedImage>,
}

/// One image file: where it goes, its name's fields, and the columns of its capture's view it
/// shows (`width` columns from `column`, wrapping around a panorama).
#[derive(Clone, Debug)]
pub struct PlannedImage {
    /// Relative to the dataset folder, e.g. `train/@...@.jpg`.
    pub path: PathBuf,
    pub name: ImageName,
    pub column: usize,
    pub width: usize,
}

/// The city and every capture, in file-writing order.
pub struct Plan {
    pub city: City,
    pub captures: Vec<Capture>,
}

/// The dataset folders, relative to the dataset folder.
pub const TRAIN: &str = "train";
pub const TRAIN_PANORAMAS: &str = "train_panoramas";

/// The weather and light of a capture.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Weather {
    Day,
    Overcast,
    Dusk,
    Night,
    Haze,
}

impl Weather {
    fn note(self) -> &'static str {
        match self {
            Weather::Day => "day",
            Weather::Overcast => "overcast",
            Weather::Dusk => "dusk",
            Weather::Night => "night",
            Weather::Haze => "haze",
        }
    }

    /// Hours of the day it is photographed at.
    fn hours(self) -> (u64, u64) {
        match self {
            Weather::Day => (10, 16),
            Weather::Overcast => (9, 17),
            Weather::Dusk => (18, 20),
            Weather::Night => (21, 24),
            Weather::Haze => (7, 10),
        }
    }
}

/// Weathers with their probabilities, for training captures and for queries.
const TRAIN_WEATHER: [(Weather, f64); 5] = [
    (Weather::Day, 0.4),
    (Weather::Overcast, 0.2),
    (Weather::Dusk, 0.15),
    (Weather::Haze, 0.15),
    (Weather::Night, 0.1),
];
const QUERY_WEATHER: [(Weather, f64); 5] = [
    (Weather::Day, 0.15),
    (Weather::Overcast, 0.25),
    (Weather::Dusk, 0.2),
    (Weather::Haze, 0.2),
    (Weather::Night, 0.2),
];

/// The districts' sizes: blocks of the city, and how many segments each district holds.
struct Districts {
    train_columns: usize,
    test_columns: usize,
    rows: usize,
}

impl Districts {
    fn for_segments(train: usize, test: usize) -> Districts {
        let rows = ((train as f64 / 2.0).sqrt().ceil() as usize).max(1);
        // segments of a district `columns` blocks wide: east-west along every street of the
        // district, north-south on its `columns + 1` streets
        let segments = |columns: usize| columns * (rows + 1) + (columns + 1) * rows;
        let columns = |needed: usize| (1..).find(|&c| segments(c) >= needed).unwrap_or(1);
        Districts {
            train_columns: columns(train),
            test_columns: columns(test),
            rows,
        }
    }

    /// Blocks east-west: the training district, two blocks between, the test district.
    fn blocks_x(&self) -> usize {
        self.train_columns + 2 + self.test_columns
    }

    /// The segments of the district whose vertical streets are `first..=last`.
    fn segments(&self, city: &City, first: usize, last: usize) -> Vec<Segment> {
        city.segments()
            .into_iter()
            .filter(|s| {
                if s.north_south {
                    (first..=last).contains(&s.street)
                } else {
                    s.from >= first && s.from < last
                }
            })
            .collect()
    }
}

/// A place: where its 10 m cell starts along its segment's street.
#[derive(Clone, Copy, Debug)]
struct Place {
    segment: Segment,
    /// Local coordinate along the street where the cell starts.
    start: f64,
    /// Local coordinate across the street of its centre line.
    centre: f64,
}

impl Place {
    /// Local (east, north) of the point `along` metres into the cell and `lateral` metres off
    /// the centre line, in centimetres.
    fn point(&self, along: f64, lateral: f64) -> [f64; 2] {
        let (a, c) = (self.start + along, self.centre + lateral);
        let p = if self.segment.north_south {
            [c, a]
        } else {
            [a, c]
        };
        p.map(to_centimetres)
    }

    /// Bearing of the street's direction (east or north).
    fn street_bearing(&self) -> u32 {
        if self.segment.north_south {
            0
        } else {
            90
        }
    }
}

fn places_of(segments: &[Segment], count: usize) -> Vec<Place> {
    segments
        .iter()
        .flat_map(|&segment| {
            let (first, centre) = if segment.north_south {
                (City::street_y(segment.from), City::street_x(segment.street))
            } else {
                (City::street_x(segment.from), City::street_y(segment.street))
            };
            (0..PLACES_PER_SEGMENT).map(move |m| Place {
                segment,
                start: first + PLACE / 2.0 + 2.0 * m as f64 * PLACE,
                centre,
            })
        })
        .take(count)
        .collect()
}

/// Derives the seed of stream `stream` from the user's seed.
fn derive(seed: u64, stream: u64) -> u64 {
    Rng::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F)).next_u64()
}

impl Plan {
    pub fn new(options: &SynthOptions) -> Result<Plan> {
        options.validate()?;
        let size = options.image_size;
        let turn = options.panorama_width();
        let train_segments = options.places.div_ceil(PLACES_PER_SEGMENT);
        let eval_places = options.eval_places();
        let districts =
            Districts::for_segments(train_segments, eval_places.div_ceil(PLACES_PER_SEGMENT));
        let city = City::new(districts.blocks_x(), districts.rows, options.seed);
        let train_streets = districts.train_columns;
        let test_first = train_streets + 2;
        let train_places = places_of(&districts.segments(&city, 0, train_streets), options.places);
        let test_places = places_of(
            &districts.segments(&city, test_first, test_first + districts.test_columns),
            eval_places,
        );
        if train_places.len() < options.places || test_places.len() < eval_places {
            return Err(Error::Argument(format!(
                "--places {}: the city's districts hold {} training and {} test places",
                options.places,
                train_places.len(),
                test_places.len()
            )));
        }
        let mut rng = Rng::new(derive(options.seed, 1));
        let horizon = HORIZON * size as f64;
        let mut captures = Vec::new();

        // training panoramas and their crops
        for (p, place) in train_places.iter().enumerate() {
            for k in 0..CAPTURES_PER_PLACE {
                let along =
                    (k as f64 + 0.1 + 0.8 * rng.uniform()) * PLACE / CAPTURES_PER_PLACE as f64;
                let position = place.point(along, 4.0 * rng.uniform() - 2.0);
                let backwards = rng.below(2) as u32 * 180;
                let heading =
                    (place.street_bearing() + backwards + 350 + rng.below(21) as u32) % 360;
                let weather = pick_weather(&TRAIN_WEATHER, &mut rng);
                let appearance = sample_appearance(weather, &mut rng);
                let id = format!("t{:06}", p * CAPTURES_PER_PLACE + k);
                let time = timestamp(weather, &mut rng);
                let name = |tile: usize, heading: u32| ImageName {
                    position,
                    pano_id: id.clone(),
                    tile,
                    heading,
                    timestamp: time.clone(),
                    note: weather.note().into(),
                };
                let mut images = vec![PlannedImage {
                    path: PathBuf::from(TRAIN_PANORAMAS).join(name(0, heading).file_name()),
                    name: name(0, heading),
                    column: 0,
                    width: turn,
                }];
                for c in 0..CROPS_PER_PANORAMA {
                    // crop c is centred 30c degrees clockwise of the panorama's centre column
                    let centre = turn / 2 + c * turn / CROPS_PER_PANORAMA;
                    let crop_heading = (heading + 30 * c as u32) % 360;
                    let n = name(c, crop_heading);
                    images.push(PlannedImage {
                        path: PathBuf::from(TRAIN).join(n.file_name()),
                        name: n,
                        column: (centre + turn - size / 2) % turn,
                        width: size,
                    });
                }
                captures.push(Capture {
                    view: View {
                        position,
                        camera_height: CAMERA_HEIGHT,
                        bearing: heading as f64,
                        width: turn,
                        height: size,
                        turn,
                        horizon,
                    },
                    appearance,
                    noise_seed: derive(options.seed, 1 << 32 | captures.len() as u64),
                    images,
                });
            }
        }

        // val on every fourth training place, test on the test district
        let stride = (train_places.len() / eval_places).max(1);
        let val_places: Vec<Place> = (0..eval_places)
            .map(|i| train_places[(i * stride + stride / 2).min(train_places.len() - 1)])
            .collect();
        for (split, places, sun_azimuth) in
            [("val", &val_places, 150.0), ("test", &test_places, 215.0)]
        {
            let reference = reference_appearance(sun_azimuth);
            let date = if split == "val" {
                "20240612"
            } else {
                "20240918"
            };
            for (p, place) in places.iter().enumerate() {
                let position = place.point(3.0 + 4.0 * rng.uniform(), 2.0 * rng.uniform() - 1.0);
                let first = rng.below(30) as u32;
                for c in 0..CROPS_PER_PANORAMA {
                    let heading = first + 30 * c as u32;
                    let name = ImageName {
                        position,
                        pano_id: format!("{}{p:05}", &split[..1]),
                        tile: c,
                        heading,
                        timestamp: format!("{date}_120000"),
                        note: "day".into(),
                    };
                    captures.push(single_view(
                        PathBuf::from(split).join("database"),
                        name,
                        CAMERA_HEIGHT,
                        horizon,
                        options,
                        reference,
                        derive(options.seed, 2 << 32 | captures.len() as u64),
                    ));
                }
            }
            for q in 0..options.queries() {
                let place = places[rng.below(places.len() as u64) as usize];
                let position = place.point(0.2 + 9.6 * rng.uniform(), 5.0 * rng.uniform() - 2.5);
                let weather = pick_weather(&QUERY_WEATHER, &mut rng);
                let appearance = sample_appearance(weather, &mut rng);
                let camera_height = 1.6 + rng.uniform();
                let tilt = (rng.uniform() - 0.5) * 0.1 * size as f64;
                let name = ImageName {
                    position,
                    pano_id: format!("{}q{q:04}", &split[..1]),
                    tile: 0,
                    heading: rng.below(360) as u32,
                    timestamp: timestamp(weather, &mut rng),
                    note: weather.note().into(),
                };
                captures.push(single_view(
                    PathBuf::from(split).join("queries"),
                    name,
                    camera_height,
                    horizon + tilt,
                    options,
                    appearance,
                    derive(options.seed, 3 << 32 | captures.len() as u64),
                ));
            }
        }
        Ok(Plan { city, captures })
    }

    /// Every planned image.
    pub fn images(&self) -> impl Iterator<Item = &PlannedImage> {
        self.captures.iter().flat_map(|c| &c.images)
    }
}

/// A capture of one square image at the name's position and heading.
fn single_view(
    folder: PathBuf,
    name: ImageName,
    camera_height: f64,
    horizon: f64,
    options: &SynthOptions,
    appearance: Appearance,
    noise_seed: u64,
) -> Capture {
    let size = options.image_size;
    Capture {
        view: View {
            position: name.position,
            camera_height,
            bearing: name.heading as f64,
            width: size,
            height: size,
            turn: options.panorama_width(),
            horizon,
        },
        appearance,
        noise_seed,
        images: vec![PlannedImage {
            path: folder.join(name.file_name()),
            name,
            column: 0,
            width: size,
        }],
    }
}

fn pick_weather(table: &[(Weather, f64)], rng: &mut Rng) -> Weather {
    let mut u = rng.uniform();
    for &(weather, p) in table {
        if u < p {
            return weather;
        }
        u -= p;
    }
    table[table.len() - 1].0
}

fn timestamp(weather: Weather, rng: &mut Rng) -> String {
    let (from, to) = weather.hours();
    let hour = from + rng.below(to - from);
    format!(
        "2023{:02}{:02}_{:02}{:02}00",
        1 + rng.below(12),
        1 + rng.below(28),
        hour % 24,
        rng.below(60)
    )
}

/// Uniform in [lo, hi).
fn between(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

fn between32(rng: &mut Rng, lo: f32, hi: f32) -> f32 {
    between(rng, lo as f64, hi as f64) as f32
}

/// The clear day the database of a split is photographed on.
fn reference_appearance(sun_azimuth: f64) -> Appearance {
    Appearance {
        sun_azimuth,
        sun_elevation: 45.0,
        sun: 0.65,
        ambient: 0.55,
        exposure: 1.0,
        tint: [1.0; 3],
        saturation: 1.0,
        contrast: 1.0,
        sky_horizon: [0.75, 0.84, 0.95],
        sky_zenith: [0.3, 0.5, 0.85],
        clouds: 0.2,
        cloud_colour: [0.95, 0.95, 0.97],
        cloud_shift: 0.0,
        visibility: 800.0,
        lit_windows: 0.0,
        lamp: [1.0, 0.85, 0.5],
        noise: 2.5,
    }
}

fn sample_appearance(weather: Weather, rng: &mut Rng) -> Appearance {
    let day = reference_appearance(between(rng, 0.0, 360.0));
    let tint_jitter = [0; 3].map(|_| between32(rng, 0.93, 1.07));
    let cloud_shift = between(rng, 0.0, 1000.0);
    let a = match weather {
        Weather::Day => Appearance {
            sun_elevation: between(rng, 25.0, 65.0),
            sun: between32(rng, 0.55, 0.75),
            ambient: between32(rng, 0.45, 0.6),
            exposure: between32(rng, 0.9, 1.15),
            saturation: between32(rng, 0.9, 1.15),
            contrast: between32(rng, 0.95, 1.1),
            clouds: between32(rng, 0.0, 0.45),
            visibility: between(rng, 400.0, 900.0),
            ..day
        },
        Weather::Overcast => Appearance {
            sun: between32(rng, 0.05, 0.15),
            ambient: between32(rng, 0.75, 0.9),
            exposure: between32(rng, 0.85, 1.05),
            tint: [0.97, 1.0, 1.04],
            saturation: between32(rng, 0.6, 0.85),
            contrast: between32(rng, 0.8, 0.95),
            sky_horizon: [0.78, 0.8, 0.82],
            sky_zenith: [0.6, 0.63, 0.68],
            clouds: between32(rng, 0.75, 1.0),
            cloud_colour: [0.68, 0.7, 0.73],
            visibility: between(rng, 250.0, 500.0),
            ..day
        },
        Weather::Dusk => Appearance {
            sun_elevation: between(rng, 2.0, 12.0),
            sun: between32(rng, 0.45, 0.6),
            ambient: between32(rng, 0.3, 0.4),
            exposure: between32(rng, 0.75, 0.95),
            tint: [1.15, 0.92, 0.75],
            sky_horizon: [0.95, 0.6, 0.35],
            sky_zenith: [0.3, 0.25, 0.45],
            clouds: between32(rng, 0.0, 0.5),
            cloud_colour: [0.85, 0.55, 0.45],
            visibility: between(rng, 300.0, 700.0),
            lit_windows: between32(rng, 0.15, 0.35),
            ..day
        },
        Weather::Night => Appearance {
            sun: 0.0,
            ambient: between32(rng, 0.2, 0.3),
            exposure: between32(rng, 1.0, 1.2),
            tint: [0.8, 0.9, 1.15],
            saturation: between32(rng, 0.7, 0.9),
            sky_horizon: [0.1, 0.12, 0.2],
            sky_zenith: [0.02, 0.03, 0.08],
            clouds: between32(rng, 0.0, 0.3),
            cloud_colour: [0.12, 0.12, 0.15],
            visibility: between(rng, 200.0, 500.0),
            lit_windows: between32(rng, 0.25, 0.45),
            noise: between32(rng, 4.0, 6.0),
            ..day
        },
        Weather::Haze => Appearance {
            sun: between32(rng, 0.2, 0.35),
            ambient: between32(rng, 0.6, 0.75),
            saturation: between32(rng, 0.6, 0.8),
            sky_horizon: [0.82, 0.82, 0.8],
            sky_zenith: [0.7, 0.72, 0.75],
            clouds: 0.0,
            visibility: between(rng, 40.0, 90.0),
            ..day
        },
    };
    Appearance {
        tint: [0, 1, 2].map(|c| a.tint[c] * tint_jitter[c]),
        cloud_shift,
        ..a
    }
}
