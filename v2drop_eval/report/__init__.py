"""Reports from sweep folders: reading points (``results``), the accuracy / efficiency / comparison tables
(``tables``), their Markdown / CSV / LaTeX (``render``), plots (``plots``), intervals and paired tests
(``stats``), everything written at once (``build``) and two sweeps compared (``compare``). Imports the sweep
layer to read its folders; nothing above it."""
