"""jisu's own compute kernels (C++), built on first use and cached, with torch as the fallback."""
