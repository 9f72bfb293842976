use std::time::{Duration, Instant};

/// How often [`eventually`] retries.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value.
///
/// Panics after `deadline` with `what` and the last error `f` returned. `f` always runs at least
/// once, and once more after the deadline if the previous attempt started before it.
#[track_caller]
pub fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let err = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            panic!(
                "timed out after {elapsed:?} ({attempts} attempts) waiting for {what}; last error: {err}"
            );
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - elapsed));
    }
}

/// Polls a boolean condition until it holds, panicking after the deadline.
///
/// ```
/// use std::time::Duration;
/// use vmesh_testkit::assert_eventually;
/// let mut n = 0;
/// assert_eventually!(Duration::from_secs(1), { n += 1; n >= 3 });
/// assert_eventually!(Duration::from_secs(1), n >= 3, "n was {}", n);
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($deadline:expr, $cond:expr $(,)?) => {
        $crate::eventually($deadline, ::core::stringify!($cond), || {
            if $cond {
                ::core::result::Result::Ok(())
            } else {
                ::core::result::Result::Err(::std::string::String::from("condition was false"))
            }
        })
    };
    ($deadline:expr, $cond:expr, $($fmt:tt)+) => {
        $crate::eventually($deadline, ::core::stringify!($cond), || {
            if $cond {
                ::core::result::Result::Ok(())
            } else {
                ::core::result::Result::Err(::std::format!($($fmt)+))
            }
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_first_ok() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(2), "n to reach 3", || {
            n += 1;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("n={n}"))
            }
        });
        assert_eq!(v, 3);
    }

    #[test]
    fn panics_with_last_error() {
        let err = std::panic::catch_unwind(|| {
            eventually::<()>(Duration::from_millis(50), "the impossible", || {
                Err("still no".into())
            })
        })
        .expect_err("must time out");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("the impossible"), "{msg}");
        assert!(msg.contains("still no"), "{msg}");
    }

    #[test]
    fn macro_forms() {
        let mut n = 0;
        assert_eventually!(Duration::from_secs(1), {
            n += 1;
            n >= 2
        });
        assert_eventually!(Duration::from_secs(1), n >= 2, "n was {}", n);
        let r = std::panic::catch_unwind(|| {
            assert_eventually!(Duration::from_millis(30), 1 + 1 == 3, "math is {}", "hard");
        });
        let msg = r
            .expect_err("must time out")
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            msg.contains("1 + 1 == 3") && msg.contains("math is hard"),
            "{msg}"
        );
    }
}
