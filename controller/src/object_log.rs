//! One log line per change of an object's judgement (accepted, warned, rejected, removed) and of
//! a source's problems: what an operator tailing the log needs to see, once, not on every
//! rescan.

use std::collections::BTreeMap;

use tracing::{info, warn};
use vmesh_model::{ObjectKey, ObjectReport, Problem, State};

/// Objects' reports and sources' problems, as published.
pub type Reports<'a> = (
    &'a BTreeMap<ObjectKey, ObjectReport>,
    &'a BTreeMap<String, Vec<Problem>>,
);

/// What is compared: the state and the problems, not the version or the proxies.
type Judgement<'a> = (State, &'a [Problem], &'a [Problem], bool);

fn judgement(r: &ObjectReport) -> Judgement<'_> {
    (r.state, &r.errors, &r.warnings, r.serving_last_good)
}

/// A line to log.
#[derive(Debug, PartialEq)]
pub enum Line {
    Accepted {
        object: String,
    },
    Warning {
        object: String,
        problems: String,
    },
    Rejected {
        object: String,
        problems: String,
        serving_last_good: bool,
    },
    Removed {
        object: String,
    },
    SourceProblems {
        source: String,
        problems: String,
    },
    SourceClean {
        source: String,
    },
}

/// At most this many problems are spelled out per line.
const SHOWN: usize = 3;

fn spell(problems: &[Problem]) -> String {
    let mut text: Vec<String> = problems.iter().take(SHOWN).map(|p| p.to_string()).collect();
    if problems.len() > SHOWN {
        text.push(format!("and {} more", problems.len() - SHOWN));
    }
    text.join("; ")
}

/// The lines for going from `previous` (`None`: nothing was published yet) to `next`. On the
/// first publication only objects and sources with problems are named: a start with thousands
/// of valid objects stays quiet.
pub fn lines(
    previous: Option<Reports<'_>>,
    next: &BTreeMap<ObjectKey, ObjectReport>,
    next_sources: &BTreeMap<String, Vec<Problem>>,
) -> Vec<Line> {
    let mut out = Vec::new();
    let (prev_objects, prev_sources) = match previous {
        Some((o, s)) => (Some(o), Some(s)),
        None => (None, None),
    };
    for (key, report) in next {
        let before = prev_objects.and_then(|p| p.get(key));
        if before.map(judgement) == Some(judgement(report)) {
            continue;
        }
        let object = key.to_string();
        match report.state {
            State::Accepted if prev_objects.is_some() => out.push(Line::Accepted { object }),
            State::Accepted => {}
            State::Warning => out.push(Line::Warning {
                object,
                problems: spell(&report.warnings),
            }),
            State::Rejected => out.push(Line::Rejected {
                object,
                problems: spell(&report.errors),
                serving_last_good: report.serving_last_good,
            }),
        }
    }
    for key in prev_objects.into_iter().flat_map(|p| p.keys()) {
        if !next.contains_key(key) {
            out.push(Line::Removed {
                object: key.to_string(),
            });
        }
    }
    for (source, problems) in next_sources {
        if prev_sources.and_then(|p| p.get(source)) != Some(problems) {
            out.push(Line::SourceProblems {
                source: source.clone(),
                problems: spell(problems),
            });
        }
    }
    for source in prev_sources.into_iter().flat_map(|p| p.keys()) {
        if !next_sources.contains_key(source) {
            out.push(Line::SourceClean {
                source: source.clone(),
            });
        }
    }
    out
}

pub fn log(lines: &[Line]) {
    for line in lines {
        match line {
            Line::Accepted { object } => info!(%object, "object accepted"),
            Line::Warning { object, problems } => {
                warn!(%object, %problems, "object served with warnings")
            }
            Line::Rejected {
                object,
                problems,
                serving_last_good,
            } => warn!(
                %object,
                %problems,
                serving_last_good,
                "object rejected"
            ),
            Line::Removed { object } => info!(%object, "object removed"),
            Line::SourceProblems { source, problems } => {
                warn!(%source, %problems, "source has problems")
            }
            Line::SourceClean { source } => info!(%source, "source problems resolved"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: State, problem: Option<&str>) -> ObjectReport {
        let problems: Vec<Problem> = problem
            .map(|m| Problem::new("spec.x", m))
            .into_iter()
            .collect();
        ObjectReport {
            state,
            errors: if state == State::Rejected {
                problems.clone()
            } else {
                vec![]
            },
            warnings: if state == State::Warning {
                problems
            } else {
                vec![]
            },
            source: "a.yaml".into(),
            version: "v".into(),
            serving_last_good: false,
            serving_version: None,
            certificates: vec![],
        }
    }

    #[test]
    fn each_change_is_said_once() {
        let web = ObjectKey::virtual_service("web");
        let api = ObjectKey::upstream("api");
        let none = BTreeMap::new();
        let first = BTreeMap::from([
            (web.clone(), report(State::Accepted, None)),
            (api.clone(), report(State::Rejected, Some("bad port"))),
        ]);
        // The first publication names only what has problems.
        assert_eq!(
            lines(None, &first, &none),
            [Line::Rejected {
                object: "Upstream/api".into(),
                problems: "spec.x: bad port".into(),
                serving_last_good: false
            }]
        );
        // The same judgement again (a rescan): nothing.
        assert_eq!(lines(Some((&first, &none)), &first.clone(), &none), []);
        // api fixed, web warned, a source broken.
        let second = BTreeMap::from([
            (
                web.clone(),
                report(State::Warning, Some("no such upstream")),
            ),
            (api.clone(), report(State::Accepted, None)),
        ]);
        let broken = BTreeMap::from([(
            "b.yaml".to_string(),
            vec![Problem::new("documents[1].name", "missing")],
        )]);
        assert_eq!(
            lines(Some((&first, &none)), &second, &broken),
            [
                Line::Accepted {
                    object: "Upstream/api".into()
                },
                Line::Warning {
                    object: "VirtualService/web".into(),
                    problems: "spec.x: no such upstream".into()
                },
                Line::SourceProblems {
                    source: "b.yaml".into(),
                    problems: "documents[1].name: missing".into()
                },
            ]
        );
        // web removed, the source fixed.
        let third = BTreeMap::from([(api, report(State::Accepted, None))]);
        assert_eq!(
            lines(Some((&second, &broken)), &third, &none),
            [
                Line::Removed {
                    object: "VirtualService/web".into()
                },
                Line::SourceClean {
                    source: "b.yaml".into()
                },
            ]
        );
    }

    #[test]
    fn many_problems_are_cut_short() {
        let problems: Vec<Problem> = (0..5).map(|i| Problem::new("", format!("p{i}"))).collect();
        assert_eq!(spell(&problems), "p0; p1; p2; and 2 more");
    }
}
