//! (to be written)

use crate::gate::Page;

pub(crate) fn pages() -> Vec<Page> {
    vec![]
}
