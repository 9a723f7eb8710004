"""The compress flow and what is built around it: stages, accuracy control, sweep, search, inspect, artifact."""
