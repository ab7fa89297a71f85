"""The web pages: rights holders' works, where each was used and their share; the operator's
attributions (the paper's Figure 2 layout), jobs and validations; and /docs served offline.

Server-rendered (Jinja2, autoescaped), no JavaScript of their own, every asset served by the app.
"""
