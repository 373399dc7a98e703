"""The operator's views of the run store: web console, exports, TensorBoard.

Everything here only reads the store (and checkpoint files it names); the
federation loop is the only writer, so a console can be started, stopped or
crash at any time without touching a running federation.
"""
