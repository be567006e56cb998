"""The front doors: each converts its protocol's request into one data-plane call and the answer back."""
