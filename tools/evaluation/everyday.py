"""The 16 everyday sentences: what a user types and the answer anyone would give. They are
development data (the fusion weights are fitted on them, among others) and the
"everyday" figure of ``tools evaluate``."""

# Everyday sentences with one obvious character missing (written before looking at
# any model's answers; none of them is in the training corpus verbatim).
EVERYDAY = [
    ("床前明月光，疑是地[MASK]霜。", "上"),
    ("今天天气很好，我们去公[MASK]散步吧。", "园"),
    ("他每天早上都喝一杯咖[MASK]。", "啡"),
    ("我在北京上大[MASK]，学的是计算机。", "学"),
    ("春眠不觉晓，处处闻啼[MASK]。", "鸟"),
    ("请把窗户关上，外面风太[MASK]了。", "大"),
    ("妈妈做的饭菜非常好[MASK]。", "吃"),
    ("我们明天上午九点在学校门[MASK]见面。", "口"),
    ("火车晚点了半个小[MASK]。", "时"),
    ("学而时习之，不亦说[MASK]？", "乎"),
    ("中华人民共和[MASK]成立于一九四九年。", "国"),
    ("这部电影太好看了，我想再看一[MASK]。", "遍"),
    ("他生病了，今天没有来上[MASK]。", "班"),
    ("白日依山尽，黄河入海[MASK]。", "流"),
    ("我的手机没[MASK]了，借你的充电器用一下。", "电"),
    ("周末我们一起去超市买东[MASK]吧。", "西"),
]
