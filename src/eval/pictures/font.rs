//! A 5x7 bitmap font for the captions and axis labels of the evaluation pictures, so that they
//! need no font file. The glyph table is our own, drawn here as text art: `#` is an ink pixel,
//! each glyph is 7 rows of 5 columns, top row first.

/// Columns of a glyph.
pub const GLYPH_WIDTH: usize = 5;
/// Rows of a glyph.
pub const GLYPH_HEIGHT: usize = 7;
/// Columns from one glyph's left edge to the next one's: the glyph and one blank column.
pub const ADVANCE: usize = GLYPH_WIDTH + 1;

/// Rows of a glyph, top first; `#` is ink.
pub type Glyph = [&'static str; GLYPH_HEIGHT];

/// What a character without a glyph draws: a small box.
pub const UNKNOWN: Glyph = [
    "     ", "#####", "#   #", "#   #", "#   #", "#####", "     ",
];

/// The glyph of `c`, lower case drawn as upper case; [`UNKNOWN`] for characters the table has
/// no glyph for.
pub fn glyph(c: char) -> Glyph {
    let upper = c.to_ascii_uppercase();
    GLYPHS
        .iter()
        .find(|(g, _)| *g == upper)
        .map_or(UNKNOWN, |(_, rows)| *rows)
}

/// Every character the font draws, with its glyph.
#[rustfmt::skip]
pub const GLYPHS: &[(char, Glyph)] = &[
    (' ', ["     ", "     ", "     ", "     ", "     ", "     ", "     "]),
    ('0', [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "]),
    ('1', ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "]),
    ('2', [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"]),
    ('3', ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "]),
    ('4', ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "]),
    ('5', ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "]),
    ('6', ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "]),
    ('7', ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "]),
    ('8', [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "]),
    ('9', [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "]),
    ('A', [" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"]),
    ('B', ["#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "]),
    ('C', [" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "]),
    ('D', ["###  ", "#  # ", "#   #", "#   #", "#   #", "#  # ", "###  "]),
    ('E', ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"]),
    ('F', ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "]),
    ('G', [" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"]),
    ('H', ["#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"]),
    ('I', [" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "]),
    ('J', ["  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "]),
    ('K', ["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"]),
    ('L', ["#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"]),
    ('M', ["#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"]),
    ('N', ["#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"]),
    ('O', [" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "]),
    ('P', ["#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "]),
    ('Q', [" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"]),
    ('R', ["#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"]),
    ('S', [" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "]),
    ('T', ["#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "]),
    ('U', ["#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "]),
    ('V', ["#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "]),
    ('W', ["#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "]),
    ('X', ["#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"]),
    ('Y', ["#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "]),
    ('Z', ["#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"]),
    ('@', [" ### ", "#   #", "# ###", "# # #", "# ###", "#    ", " ####"]),
    ('.', ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "]),
    (',', ["     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "]),
    (':', ["     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "]),
    ('%', ["##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"]),
    ('-', ["     ", "     ", "     ", "#####", "     ", "     ", "     "]),
    ('>', [" #   ", "  #  ", "   # ", "    #", "   # ", "  #  ", " #   "]),
    ('/', ["     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "]),
    ('(', ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "]),
    (')', [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "]),
    ('_', ["     ", "     ", "     ", "     ", "     ", "     ", "#####"]),
    ('#', [" # # ", " # # ", "#####", " # # ", "#####", " # # ", " # # "]),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn ink(glyph: &Glyph) -> usize {
        glyph.iter().map(|row| row.matches('#').count()).sum()
    }

    #[test]
    fn every_glyph_is_five_by_seven_of_ink_and_blank() {
        for (c, rows) in GLYPHS.iter().chain([&('?', UNKNOWN)]) {
            for row in rows {
                assert_eq!(row.len(), GLYPH_WIDTH, "{c:?}: row {row:?}");
                assert!(row.chars().all(|p| p == '#' || p == ' '), "{c:?}: {row:?}");
            }
        }
    }

    #[test]
    fn every_glyph_but_space_has_ink_and_all_differ() {
        for (c, rows) in GLYPHS {
            assert_eq!(ink(rows) == 0, *c == ' ', "{c:?}: ink {}", ink(rows));
        }
        let all: Vec<(char, Glyph)> = GLYPHS.iter().copied().chain([('?', UNKNOWN)]).collect();
        for (i, (a, rows_a)) in all.iter().enumerate() {
            for (b, rows_b) in &all[i + 1..] {
                assert_ne!(a, b, "{a:?} is in the table twice");
                assert_ne!(rows_a, rows_b, "{a:?} and {b:?} draw the same");
            }
        }
    }

    #[test]
    fn the_table_covers_what_the_pictures_write() {
        let needed = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ @.,:%->/()_#";
        for c in needed.chars() {
            assert!(GLYPHS.iter().any(|(g, _)| *g == c), "no glyph for {c:?}");
        }
    }

    #[test]
    fn lower_case_draws_as_upper_case_and_unknown_characters_as_a_box() {
        for c in 'a'..='z' {
            assert_eq!(glyph(c), glyph(c.to_ascii_uppercase()), "{c:?}");
        }
        for c in ['?', '~', 'é', '\u{1F600}'] {
            assert_eq!(glyph(c), UNKNOWN, "{c:?}");
        }
        assert_ne!(glyph('A'), UNKNOWN);
    }
}
