//! A switch in the environment: `on` or `off` (any case, spaces around ignored), with a default
//! for when it is unset.

/// Whether the switch `name` is on. Anything but `on` or `off` is warned about (naming `what`
/// stays on) and counts as on: a typo never turns a protection off.
pub fn on_unless_off(name: &str, what: &str) -> bool {
    match std::env::var(name) {
        Err(_) => true,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "on" => true,
            "off" => false,
            _ => {
                tracing::warn!("{name}={v:?} is neither on nor off; {what} stays on");
                true
            }
        },
    }
}

/// Whether the experimental switch `name` is on: only `on` turns it on. Anything but `on` or
/// `off` is warned about (naming `what`) and counts as off: a typo never turns an experiment on.
pub fn off_unless_on(name: &str, what: &str) -> bool {
    match std::env::var(name) {
        Err(_) => false,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "on" => true,
            "off" => false,
            _ => {
                tracing::warn!("{name}={v:?} is neither on nor off; {what} stays off");
                false
            }
        },
    }
}
