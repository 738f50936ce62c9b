//! Placeholder: the pool partitioner is being written.
