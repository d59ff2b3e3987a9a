//! Status of volumes as JSON, like /proc/elastio-info.
