//! Placeholder: the app runtime (process supervisor) is being written.
