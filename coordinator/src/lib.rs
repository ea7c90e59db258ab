//! distbuild coordinator (skeleton; built in a later issue).
