"""A small Django project: threadctx's middleware, and LOGGING with the filter through dictConfig."""
