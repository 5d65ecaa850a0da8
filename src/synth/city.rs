//! The procedural city: a square grid of streets, every block lined with buildings (lots of
//! varied width, height, setback and facade), a few tall landmark towers inside blocks, on a map
//! of 1 m cells that the ray caster walks.

use crate::tensor::Rng;

/// Metres between the centre lines of neighbouring parallel streets. A multiple of 30, so that
/// every centre line has the same position modulo CosPlace's 10 m and EigenPlaces' 15 m cells.
pub const STREET_PITCH: usize = 90;
/// Facade-to-facade width of a street.
pub const STREET_WIDTH: usize = 20;
/// Width of the sidewalk on each side of a street.
pub const SIDEWALK: f64 = 3.0;
/// Side of a block of buildings.
pub const BLOCK: usize = STREET_PITCH - STREET_WIDTH;
/// Easting and northing (UTM zone 10S) of the map's origin: street centre lines fall at 5 m
/// modulo 30 m, in the middle of a 10 m cell across the street and 2.5 m from the edge of a
/// 15 m one, so cameras with a small lateral offset stay in one cell of either size.
pub const UTM_ORIGIN: [f64; 2] = [549_915.0, 4_179_915.0];

/// How the front of a building is laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Windows {
    /// One window per bay and floor.
    Punched,
    /// Two narrow windows per bay.
    Paired,
    /// A continuous band of glass along each floor.
    Ribbon,
    /// Floor-to-floor glass strips between piers.
    Strips,
    /// Glass all over, on a grid of mullions.
    Curtain,
}

/// The ground floor's openings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GroundFloor {
    /// Shop windows under a coloured sign band.
    Shops { sign: [f32; 3] },
    /// Doors every `pitch` metres between small windows.
    Doors { pitch: f64 },
}

/// Colours (sRGB in [0, 1]) and dimensions (metres) of a facade.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    pub wall: [f32; 3],
    /// Cornice, window frames, corner piers.
    pub trim: [f32; 3],
    pub glass: [f32; 3],
    pub windows: Windows,
    pub ground: GroundFloor,
    pub ground_height: f64,
    pub floor_height: f64,
    /// Width of one window bay.
    pub bay: f64,
    /// Window width and height as fractions of the bay and the floor.
    pub window_width: f64,
    pub window_height: f64,
    /// Depth of the cornice band at the top (0: none).
    pub cornice: f64,
    /// Amplitude of the wall's grain.
    pub grain: f32,
    /// Bands of a second colour every this many floors (landmarks; 0: none).
    pub band_every: usize,
    pub band: [f32; 3],
}

/// One building: its footprint's bounding box (texture coordinates start at its corner), its
/// height and its facade.
#[derive(Clone, Debug)]
pub struct Building {
    pub min: [f64; 2],
    pub max: [f64; 2],
    pub height: f64,
    pub style: Style,
}

/// What a point of the ground is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ground {
    /// A street's roadway, `across` metres from its centre line, `along` its length.
    Road { across: f64, along: f64 },
    /// Where two roadways cross.
    Crossing,
    /// Sidewalks and open ground.
    Paving,
}

/// A street segment between two neighbouring intersections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segment {
    /// Runs north-south (along a vertical street) or east-west.
    pub north_south: bool,
    /// The street: index of its centre line among the vertical (north-south segments) or the
    /// horizontal streets.
    pub street: usize,
    /// The intersection it starts from, counted along the street.
    pub from: usize,
}

/// The city map and its buildings.
pub struct City {
    /// Map size in metres (= cells) east and north.
    pub width: usize,
    pub height: usize,
    /// Vertical streets (x = const) and horizontal streets (y = const).
    pub streets_x: usize,
    pub streets_y: usize,
    /// Building id of every 1 m cell (`buildings[id - 1]`), 0 for open ground; row-major
    /// from the south-west corner (`y * width + x`).
    cells: Vec<u16>,
    pub buildings: Vec<Building>,
}

/// A lot along one side of a block: its extent along the side (metres from the block corner),
/// its setback from the street, or `None` for a gap.
struct Lot {
    start: usize,
    end: usize,
    setback: usize,
    building: Option<u16>,
}

impl City {
    /// A city with `blocks_x` x `blocks_y` blocks between its streets (so one more street each
    /// way), surrounded by a ring of blocks that are built but have no street beyond them.
    pub fn new(blocks_x: usize, blocks_y: usize, seed: u64) -> City {
        let mut rng = Rng::new(seed ^ 0xC17E_5EED);
        let (streets_x, streets_y) = (blocks_x + 1, blocks_y + 1);
        let width = 2 * BLOCK + blocks_x * STREET_PITCH + STREET_WIDTH;
        let height = 2 * BLOCK + blocks_y * STREET_PITCH + STREET_WIDTH;
        let mut city = City {
            width,
            height,
            streets_x,
            streets_y,
            cells: vec![0; width * height],
            buildings: Vec::new(),
        };
        // blocks -1..=blocks: the ring and the inner ones; block b starts at b * pitch + width
        // of one street after the margin block, i.e. at (b + 1) * pitch.
        for by in 0..blocks_y + 2 {
            for bx in 0..blocks_x + 2 {
                let corner = [bx * STREET_PITCH, by * STREET_PITCH];
                let inner = (1..=blocks_x).contains(&bx) && (1..=blocks_y).contains(&by);
                city.build_block(corner, inner, &mut rng);
            }
        }
        city
    }

    /// Local x (east, metres) of the centre line of vertical street `i`.
    pub fn street_x(i: usize) -> f64 {
        (BLOCK + i * STREET_PITCH) as f64 + STREET_WIDTH as f64 / 2.0
    }

    /// Local y (north) of the centre line of horizontal street `j`.
    pub fn street_y(j: usize) -> f64 {
        City::street_x(j)
    }

    /// Every street segment: the east-west ones street by street, then the north-south ones.
    pub fn segments(&self) -> Vec<Segment> {
        let mut all = Vec::new();
        for street in 0..self.streets_y {
            for from in 0..self.streets_x - 1 {
                all.push(Segment {
                    north_south: false,
                    street,
                    from,
                });
            }
        }
        for street in 0..self.streets_x {
            for from in 0..self.streets_y - 1 {
                all.push(Segment {
                    north_south: true,
                    street,
                    from,
                });
            }
        }
        all
    }

    /// The building id of the cell holding local point (x, y); 0 outside the map.
    pub fn cell(&self, x: i64, y: i64) -> u16 {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return 0;
        }
        self.cells[y as usize * self.width + x as usize]
    }

    /// What the ground at local (x, y) is: a street's roadway, an intersection, or paving
    /// (sidewalks and the open ground inside blocks).
    pub fn ground(&self, x: f64, y: f64) -> Ground {
        let half = STREET_WIDTH as f64 / 2.0;
        let road = half - SIDEWALK;
        // distance from the nearest centre line across the streets of one direction
        let across = |v: f64| {
            let from_centre = (v - City::street_x(0)).rem_euclid(STREET_PITCH as f64);
            from_centre.min(STREET_PITCH as f64 - from_centre)
        };
        let inside = x >= City::street_x(0) - half
            && y >= City::street_y(0) - half
            && x <= City::street_x(self.streets_x - 1) + half
            && y <= City::street_y(self.streets_y - 1) + half;
        if !inside {
            return Ground::Paving;
        }
        let (dx, dy) = (across(x), across(y));
        match (dx < road, dy < road) {
            (true, true) => Ground::Crossing,
            (true, false) => Ground::Road {
                across: dx,
                along: y,
            },
            (false, true) => Ground::Road {
                across: dy,
                along: x,
            },
            (false, false) => Ground::Paving,
        }
    }

    fn add_building(&mut self, building: Building) -> u16 {
        self.buildings.push(building);
        u16::try_from(self.buildings.len()).expect("under 65536 buildings")
    }

    fn build_block(&mut self, corner: [usize; 2], inner: bool, rng: &mut Rng) {
        // lots along the four sides: south, north (along x), west, east (along y)
        let sides: Vec<Vec<Lot>> = (0..4).map(|_| self.lots(rng)).collect();
        for cy in 0..BLOCK {
            for cx in 0..BLOCK {
                let distances = [cy, BLOCK - 1 - cy, cx, BLOCK - 1 - cx];
                let side = (0..4).min_by_key(|&s| distances[s]).unwrap_or(0);
                let along = if side < 2 { cx } else { cy };
                let Some(lot) = sides[side]
                    .iter()
                    .find(|l| (l.start..l.end).contains(&along))
                else {
                    continue;
                };
                if distances[side] < lot.setback {
                    continue;
                }
                let Some(id) = lot.building else { continue };
                let (x, y) = (corner[0] + cx, corner[1] + cy);
                self.cells[y * self.width + x] = id;
                let b = &mut self.buildings[id as usize - 1];
                b.min = [b.min[0].min(x as f64), b.min[1].min(y as f64)];
                b.max = [b.max[0].max(x as f64 + 1.0), b.max[1].max(y as f64 + 1.0)];
            }
        }
        if inner && rng.uniform() < 0.3 {
            let side = 14 + rng.below(9) as usize;
            let start = [
                corner[0] + (BLOCK - side) / 2 + rng.below(5) as usize - 2,
                corner[1] + (BLOCK - side) / 2 + rng.below(5) as usize - 2,
            ];
            let id = self.add_building(Building {
                min: [start[0] as f64, start[1] as f64],
                max: [(start[0] + side) as f64, (start[1] + side) as f64],
                height: 70.0 + 80.0 * rng.uniform(),
                style: landmark_style(rng),
            });
            for y in start[1]..start[1] + side {
                for x in start[0]..start[0] + side {
                    self.cells[y * self.width + x] = id;
                }
            }
        }
    }

    /// The lots of one block side, each a new building (or a gap), their bounding boxes empty
    /// until cells are assigned.
    fn lots(&mut self, rng: &mut Rng) -> Vec<Lot> {
        let mut lots = Vec::new();
        let mut start = 0;
        while start < BLOCK {
            let mut end = start + 7 + rng.below(14) as usize;
            if BLOCK - end.min(BLOCK) < 6 {
                end = BLOCK;
            }
            let gap = rng.uniform() < 0.06;
            let setback = if rng.uniform() < 0.25 {
                1 + rng.below(3) as usize
            } else {
                0
            };
            let building = (!gap).then(|| {
                let style = building_style(rng);
                let floors = (2 + rng.below(8)) as f64;
                let height = style.ground_height + floors * style.floor_height + style.cornice;
                self.add_building(Building {
                    min: [f64::INFINITY; 2],
                    max: [f64::NEG_INFINITY; 2],
                    height,
                    style,
                })
            });
            lots.push(Lot {
                start,
                end,
                setback,
                building,
            });
            start = end;
        }
        lots
    }
}

/// Wall colours of ordinary buildings: brick, stone, stucco, pastel and painted tones.
const WALLS: [[f32; 3]; 16] = [
    [0.55, 0.25, 0.2],
    [0.42, 0.2, 0.17],
    [0.82, 0.75, 0.6],
    [0.9, 0.87, 0.78],
    [0.92, 0.92, 0.9],
    [0.6, 0.6, 0.6],
    [0.35, 0.36, 0.38],
    [0.6, 0.72, 0.82],
    [0.65, 0.78, 0.62],
    [0.92, 0.85, 0.55],
    [0.9, 0.6, 0.5],
    [0.75, 0.45, 0.3],
    [0.55, 0.55, 0.35],
    [0.25, 0.3, 0.45],
    [0.7, 0.62, 0.78],
    [0.45, 0.6, 0.55],
];

const SIGNS: [[f32; 3]; 6] = [
    [0.7, 0.12, 0.1],
    [0.1, 0.35, 0.2],
    [0.12, 0.2, 0.5],
    [0.85, 0.7, 0.15],
    [0.2, 0.2, 0.2],
    [0.9, 0.9, 0.88],
];

fn jitter(colour: [f32; 3], amount: f32, rng: &mut Rng) -> [f32; 3] {
    colour.map(|c| (c + amount * (2.0 * rng.uniform() as f32 - 1.0)).clamp(0.02, 0.98))
}

fn pick<T: Copy>(items: &[T], rng: &mut Rng) -> T {
    items[rng.below(items.len() as u64) as usize]
}

fn building_style(rng: &mut Rng) -> Style {
    let wall = jitter(pick(&WALLS, rng), 0.07, rng);
    let light_trim = rng.uniform() < 0.6;
    let trim = if light_trim {
        jitter([0.88, 0.86, 0.8], 0.06, rng)
    } else {
        jitter(wall.map(|c| c * 0.55), 0.04, rng)
    };
    let windows = pick(
        &[
            Windows::Punched,
            Windows::Punched,
            Windows::Paired,
            Windows::Ribbon,
            Windows::Strips,
            Windows::Curtain,
        ],
        rng,
    );
    let ground = if rng.uniform() < 0.55 {
        GroundFloor::Shops {
            sign: jitter(pick(&SIGNS, rng), 0.08, rng),
        }
    } else {
        GroundFloor::Doors {
            pitch: 4.0 + 6.0 * rng.uniform(),
        }
    };
    Style {
        wall,
        trim,
        glass: jitter([0.16, 0.2, 0.25], 0.05, rng),
        windows,
        ground,
        ground_height: 3.6 + 1.4 * rng.uniform(),
        floor_height: 2.9 + 1.0 * rng.uniform(),
        bay: 1.8 + 2.2 * rng.uniform(),
        window_width: 0.35 + 0.35 * rng.uniform(),
        window_height: 0.4 + 0.3 * rng.uniform(),
        cornice: if rng.uniform() < 0.6 {
            0.4 + 0.6 * rng.uniform()
        } else {
            0.0
        },
        grain: 0.03 + 0.07 * rng.uniform() as f32,
        band_every: 0,
        band: trim,
    }
}

/// Landmark towers: saturated colours, glass or banded, so that they identify a part of the
/// city from far away.
fn landmark_style(rng: &mut Rng) -> Style {
    let hue = rng.uniform();
    let wall = hsv(hue, 0.55 + 0.35 * rng.uniform(), 0.5 + 0.4 * rng.uniform());
    let band = hsv(
        (hue + 0.5) % 1.0,
        0.6 + 0.3 * rng.uniform(),
        0.4 + 0.5 * rng.uniform(),
    );
    Style {
        wall,
        trim: band,
        glass: jitter([0.2, 0.3, 0.38], 0.08, rng),
        windows: pick(&[Windows::Curtain, Windows::Strips, Windows::Ribbon], rng),
        ground: GroundFloor::Doors { pitch: 8.0 },
        ground_height: 6.0,
        floor_height: 3.5 + rng.uniform(),
        bay: 1.5 + 1.5 * rng.uniform(),
        window_width: 0.5 + 0.3 * rng.uniform(),
        window_height: 0.5 + 0.3 * rng.uniform(),
        cornice: 2.0 + 3.0 * rng.uniform(),
        grain: 0.02,
        band_every: 3 + rng.below(5) as usize,
        band,
    }
}

/// HSV (all in [0, 1]) to RGB.
fn hsv(h: f64, s: f64, v: f64) -> [f32; 3] {
    let h6 = h * 6.0;
    let sector = h6.floor() as i64 % 6;
    let f = h6 - h6.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match sector {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r as f32, g as f32, b as f32]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streets_are_open_and_blocks_are_built() {
        let city = City::new(2, 2, 7);
        for i in 0..city.streets_x {
            let x = City::street_x(i);
            for y in (0..city.height).step_by(5) {
                assert_eq!(city.cell(x as i64, y as i64), 0, "street {i} at y {y}");
            }
        }
        let built = city.cells.iter().filter(|&&c| c != 0).count();
        assert!(built > city.width * city.height / 3, "{built} built cells");
        for b in &city.buildings {
            assert!(b.min[0] <= b.max[0] || b.min[0].is_infinite());
        }
    }

    #[test]
    fn street_centre_lines_sit_mid_cell_in_utm() {
        for i in 0..5 {
            let east = UTM_ORIGIN[0] + City::street_x(i);
            let north = UTM_ORIGIN[1] + City::street_y(i);
            assert_eq!(east.rem_euclid(30.0), 5.0);
            assert_eq!(north.rem_euclid(30.0), 5.0);
        }
    }
}
