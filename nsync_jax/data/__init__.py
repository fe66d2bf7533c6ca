"""Style data: sources of (image, caption) examples, preprocessing, and the batch iterator."""
