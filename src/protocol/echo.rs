//! `echo`: every byte comes back exactly as it arrived (RFC 862).

use super::Flow;
use crate::buffer::WriteBuffer;

/// The echo protocol holds no state: whatever arrives is owed back at once.
#[derive(Debug, Default)]
pub struct Echo;

impl Echo {
    /// Queues `input` unchanged.
    pub fn on_data(&mut self, input: &[u8], out: &mut WriteBuffer) -> Flow {
        out.push(input);
        Flow::Continue
    }
}
