"""Feature analysis for the dashboard: streaming statistics (stats), decoder geometry (geometry), the SQLite store
(store: schema, writer, reader) and the pass that ties them together (pipeline.analyze)."""
