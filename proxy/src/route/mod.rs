//! Request routing: virtual host and route selection, rewrites, redirects, header mutations.
