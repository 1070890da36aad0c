//! A switch in the environment: `on` or `off` (any case, spaces around ignored), with a default
//! for when it is unset.

/// Whether the switch `name` is on. Anything but `on` or `off` is warned about (naming `what`)
/// and counts as on: a typo never turns a protection off.
pub fn on_unless_off(name: &str, what: &str) -> bool {
    switch(name, what, true)
}

/// Whether the experimental switch `name` is on: only `on` turns it on. Anything but `on` or
/// `off` is warned about (naming `what`) and counts as off: a typo never turns an experiment on.
pub fn off_unless_on(name: &str, what: &str) -> bool {
    switch(name, what, false)
}

/// The switch's value, `default` when it is unset or neither on nor off.
fn switch(name: &str, what: &str, default: bool) -> bool {
    let Ok(v) = std::env::var(name) else { return default };
    match v.trim().to_ascii_lowercase().as_str() {
        "on" => true,
        "off" => false,
        _ => {
            let stays = if default { "on" } else { "off" };
            tracing::warn!("{name}={v:?} is neither on nor off; {what} stays {stays}");
            default
        }
    }
}
