//! Block I/O engines: io_uring and the pread/pwrite thread pool used as its oracle.
