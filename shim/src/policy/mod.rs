//! What is decided: the memory budget, the time shares (throttle, turns, priorities, the cost of a
//! launch), MPS, whether a module image fits, how often a refusal is logged.
//! A module here imports from this layer and the ones below it (docs/layers.toml).

pub mod board;
pub mod budget;
pub mod cost;
pub mod flight_cost;
pub mod hold_summary;
pub mod make_room;
pub mod module_image;
pub mod mps;
pub mod mps_pipe;
pub mod period;
pub mod refusal_log;
pub mod request_load;
pub mod sched;
pub mod slice_args;
pub mod slice_cost;
pub mod slicer;
pub mod switch_ahead;
pub mod throttle;
