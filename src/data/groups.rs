//! Dataset groups and sampling weights (`--groups FILE`).
//!
//! Lit-Claire grouped its dialogue datasets by genre; GlórIA sampled its sources with
//! weights. The file lists groups in order; a dataset belongs to the first group with a
//! pattern matching its name (`*` any run of characters, `?` one character, case
//! sensitive) and samples with that group's weight:
//!
//! ```json
//! {"groups": [
//!   {"name": "theatre", "patterns": ["Theatre*", "*_play"], "weight": 2.0},
//!   {"name": "other", "patterns": ["*"]}
//! ]}
//! ```
//!
//! `weight` (default 1) is each matching dataset's weight; a trainer draws dataset `d`
//! with probability `w_d / Σ w`. A dataset no group matches forms a group of its own,
//! named after it, with weight 1.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One group of the file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    pub patterns: Vec<String>,
    #[serde(default = "one")]
    pub weight: f64,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
}

fn one() -> f64 {
    1.0
}

/// A groups file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Groups {
    #[serde(default)]
    pub description: String,
    pub groups: Vec<GroupSpec>,
}

impl Groups {
    /// Read and check a groups file.
    pub fn load(path: &Path) -> Result<Groups> {
        if std::fs::symlink_metadata(path).is_err() {
            return Err(Error::missing(path, "the --groups file"));
        }
        let bytes = super::files::read_regular(path, 64 << 20, "a groups file")?;
        let groups: Groups = serde_json::from_slice(&bytes).map_err(|e| {
            Error::bad_file(
                path,
                format!(
                    "not a groups file ({e}); expected {{\"groups\": [{{\"name\": .., \"patterns\": [..], \"weight\": ..}}]}}"
                ),
            )
        })?;
        for g in &groups.groups {
            if !(g.weight.is_finite() && g.weight >= 0.0) {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "group {:?}: weight {} must be a number >= 0",
                        g.name, g.weight
                    ),
                ));
            }
            if g.name.is_empty() || g.patterns.is_empty() {
                return Err(Error::bad_file(
                    path,
                    "every group needs a non-empty name and at least one pattern",
                ));
            }
        }
        Ok(groups)
    }

    /// The group name and weight of dataset `name`.
    pub fn assign(&self, name: &str) -> (String, f64) {
        self.groups
            .iter()
            .find(|g| g.patterns.iter().any(|p| glob_match(p, name)))
            .map(|g| (g.name.clone(), g.weight))
            .unwrap_or_else(|| (name.to_string(), 1.0))
    }

    /// Groups whose patterns match none of `names` (worth a warning).
    pub fn unused<'a>(&'a self, names: &[String]) -> Vec<&'a str> {
        self.groups
            .iter()
            .filter(|g| {
                !names
                    .iter()
                    .any(|n| g.patterns.iter().any(|p| glob_match(p, n)))
            })
            .map(|g| g.name.as_str())
            .collect()
    }
}

/// Whether `name` matches `pattern` (`*` any run, `?` one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Greedy match with backtracking to the last star.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("Theatre*", "Theatre_Moliere"));
        assert!(glob_match("*_play", "big_play"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*c", "abd"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("theatre*", "Theatre"));
    }

    #[test]
    fn first_matching_group_wins() {
        let g: Groups = serde_json::from_str(
            r#"{"groups": [{"name": "t", "patterns": ["T*"], "weight": 2},
                           {"name": "all", "patterns": ["*"]}]}"#,
        )
        .unwrap();
        assert_eq!(g.assign("Theatre"), ("t".to_string(), 2.0));
        assert_eq!(g.assign("x"), ("all".to_string(), 1.0));
        assert_eq!(Groups::default().assign("x"), ("x".to_string(), 1.0));
    }
}
