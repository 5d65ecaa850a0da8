//! Image file names in the VPR datasets' convention:
//! `@east@north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg`,
//! UTM easting and northing with 7 integer digits and 2 decimals, latitude with 3 and longitude
//! with 4 integer digits (sign included) and 5 decimals, tile with 2 and heading with 3 digits.

use super::city::UTM_ORIGIN;

/// UTM zone of the synthetic city (San Francisco's).
pub const ZONE: &str = "10";
pub const LETTER: &str = "S";

/// What a name says about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageName {
    /// Local metres on the city map (east, north); the name holds them in UTM.
    pub position: [f64; 2],
    pub pano_id: String,
    pub tile: usize,
    /// Compass bearing of the image's centre, whole degrees in [0, 360).
    pub heading: u32,
    /// `YYYYMMDD_hhmmss` of the capture.
    pub timestamp: String,
    /// The capture's weather and light.
    pub note: String,
}

impl ImageName {
    /// UTM (east, north) of the position.
    pub fn utm(&self) -> [f64; 2] {
        [
            UTM_ORIGIN[0] + self.position[0],
            UTM_ORIGIN[1] + self.position[1],
        ]
    }

    /// The file name.
    pub fn file_name(&self) -> String {
        let [east, north] = self.utm();
        let (lat, lon) = lat_lon(east, north);
        format!(
            "@{east:010.2}@{north:010.2}@{ZONE}@{LETTER}@{lat:09.5}@{lon:010.5}@{}@{:02}@{:03}@@@@{}@{}@.jpg",
            self.pano_id, self.tile, self.heading, self.timestamp, self.note
        )
    }
}

/// Latitude and longitude of a UTM zone 10 position near San Francisco, by a local linear
/// approximation (the file names carry them, no code reads them).
fn lat_lon(east: f64, north: f64) -> (f64, f64) {
    (
        37.766 + (north - 4_180_000.0) / 110_990.0,
        -122.432 + (east - 550_000.0) / 88_030.0,
    )
}

/// Rounds a local coordinate to centimetres, the precision of the names (the origin is whole
/// metres), so that the position rendered is the position named.
pub fn to_centimetres(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_field_widths() {
        let name = ImageName {
            position: [85.0, 1234.5],
            pano_id: "t000012".into(),
            tile: 3,
            heading: 7,
            timestamp: "20240611_142000".into(),
            note: "day".into(),
        };
        assert_eq!(
            name.file_name(),
            "@0550000.00@4181149.50@10@S@037.77636@-122.43200@t000012@03@007@@@@20240611_142000@day@.jpg"
        );
    }
}
