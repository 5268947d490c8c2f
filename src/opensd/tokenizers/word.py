class WordTokenizer: pass
